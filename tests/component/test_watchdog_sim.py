"""The simulated watchdog: a file the simulated device's agent arms and feeds,
and the simulator reads to decide, at power-on, whether the previous boot ended
in a watchdog reset (armed, not fed past its timeout, not magic-closed) or in a
power cut. Clocks are injected; one test uses a real process killed mid-boot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hw.errors import WatchdogError
from hw.watchdog import SimWatchdog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pair(tmp_path: Path) -> tuple[SimWatchdog, SimWatchdog, FakeClock]:
    """The device's view and the simulator's view of the same watchdog file."""
    clock = FakeClock()
    return SimWatchdog(tmp_path, clock=clock), SimWatchdog(tmp_path, clock=clock), clock


def test_a_fresh_board_has_no_watchdog_reset(tmp_path: Path) -> None:
    device, sim, _ = _pair(tmp_path)
    assert sim.power_on() is False
    assert device.last_reset_was_watchdog() is False
    assert sim.deadline() is None


def test_a_hang_past_the_timeout_is_a_watchdog_reset_seen_by_the_next_boot(tmp_path: Path) -> None:
    device, sim, clock = _pair(tmp_path)
    assert device.start(10) == 10
    clock.now += 9
    device.keepalive()
    clock.now += 10
    assert not sim.expired()  # exactly at the deadline: not yet
    clock.now += 0.5
    assert sim.expired()
    assert sim.power_on() is True
    assert device.last_reset_was_watchdog() is True
    assert not sim.expired(clock.now + 100)  # a reset disarms it


def test_a_power_cut_while_armed_but_fed_is_not_a_watchdog_reset(tmp_path: Path) -> None:
    device, sim, clock = _pair(tmp_path)
    device.start(10)
    clock.now += 5
    assert sim.power_on() is False
    assert device.last_reset_was_watchdog() is False


def test_magic_close_disarms(tmp_path: Path) -> None:
    device, sim, clock = _pair(tmp_path)
    device.start(10)
    device.stop()
    clock.now += 3600
    assert not sim.expired()
    assert sim.power_on() is False


def test_boot_status_lasts_one_boot(tmp_path: Path) -> None:
    device, sim, clock = _pair(tmp_path)
    device.start(5)
    clock.now += 6
    assert sim.power_on() is True
    device.start(5)  # arming again keeps the status this boot reads
    assert device.last_reset_was_watchdog() is True
    device.stop()
    assert sim.power_on() is False
    assert device.last_reset_was_watchdog() is False


def test_record_reset_is_reported_by_the_next_power_on(tmp_path: Path) -> None:
    device, sim, clock = _pair(tmp_path)
    device.start(5)
    clock.now += 6
    assert sim.expired()
    sim.record_reset()  # the simulator fired it (and killed the device)
    assert not sim.expired()
    assert sim.power_on(now=clock.now + 1000) is True
    assert device.last_reset_was_watchdog() is True


def test_keepalive_without_start_is_an_error(tmp_path: Path) -> None:
    device, _, _ = _pair(tmp_path)
    with pytest.raises(WatchdogError, match="not started"):
        device.keepalive()


def test_a_corrupt_record_is_a_loud_error(tmp_path: Path) -> None:
    (tmp_path / SimWatchdog.FILE).write_text("{not json")
    with pytest.raises(WatchdogError, match="invalid record"):
        SimWatchdog(tmp_path).last_reset_was_watchdog()


AGENT = """
import sys, time
from pathlib import Path
from hw.watchdog import SimWatchdog
dog = SimWatchdog(Path(sys.argv[1]))
dog.start(2)
print("armed", flush=True)
while True:
    time.sleep(0.05)
    if sys.argv[2] == "feed":
        dog.keepalive()
"""


@pytest.mark.parametrize(
    ("mode", "hung_for", "fired"), [("hang", 3.0, True), ("feed", 3.0, False), ("hang", 1.0, False)]
)
def test_killed_device_process_is_judged_by_the_watchdog_file(
    tmp_path: Path, mode: str, hung_for: float, fired: bool
) -> None:
    """A real agent process arms the file, then hangs or keeps feeding. A hung
    board runs on `hung_for` seconds after its last feed before the simulator
    cuts it; a feeding one is cut at once. Judged on the shared wall clock."""
    proc = subprocess.Popen([sys.executable, "-c", AGENT, str(tmp_path), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "armed"
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        cut_at = time.time()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    record = json.loads((tmp_path / SimWatchdog.FILE).read_text())
    assert record["armed"] is True
    if mode == "feed":
        assert record["last_keepalive"] > record["armed_at"]
    sim = SimWatchdog(tmp_path)
    ended = cut_at if mode == "feed" else record["last_keepalive"] + hung_for
    assert sim.power_on(now=ended) is fired
    assert sim.last_reset_was_watchdog() is fired
