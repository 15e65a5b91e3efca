"""`ota-agent trial-watchdog`, the process ota-trial-watchdog.service runs from
early boot, on a simulated device: a committed boot exits at once with the
watchdog released; a trial boot keeps it fed until SIGTERM (systemd stopping
the unit for boot-check) and then hands it over still running; past
[watchdog] trial_deadline it stops feeding, says so on stderr, and keeps the
device open, unfed, until the reset."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


def _record(device: SimDevice) -> dict[str, Any]:
    path = device.dir / "watchdog.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return doc


def _start(device: SimDevice) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "-c", str(device.config), "trial-watchdog"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_armed(device: SimDevice, proc: subprocess.Popen[str]) -> dict[str, Any]:
    for _ in range(200):
        rec = _record(device)
        if rec.get("armed"):
            return rec
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the watchdog was never armed")


def _set_deadline(device: SimDevice, seconds: int) -> None:
    text = device.config.read_text().replace("timeout = 30\n", f"timeout = 30\ntrial_deadline = {seconds}\n", 1)
    assert "trial_deadline" in text
    device.config.write_text(text)


def _on_trial(device: SimDevice, make_bundle: BundleFactory) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    decision = device.power_on_without_boot_check()
    assert decision.slot == "B"


def test_a_committed_boot_exits_at_once_leaving_the_watchdog_alone(device: SimDevice) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "-c", str(device.config), "trial-watchdog"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "slot A is not on trial: watchdog left alone" in done.stderr
    assert _record(device).get("armed", False) is False


def test_sigterm_in_a_trial_boot_hands_the_running_watchdog_over(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    _on_trial(device, make_bundle)
    _set_deadline(device, 86400)  # longer than this host has been up
    proc = _start(device)
    try:
        _wait_armed(device, proc)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert "trial boot of slot B" in err
    assert "handed over to boot-check" in err
    rec = _record(device)
    assert rec["armed"] is True  # still running: boot-check must open it within the hand-over timeout
    assert rec["timeout_s"] == 120
    assert time.time() - rec["last_keepalive"] < 30


def test_past_the_trial_deadline_it_stops_feeding_and_holds_the_device_until_the_reset(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    _on_trial(device, make_bundle)
    _set_deadline(device, 10)  # this host's kernel started longer ago than that
    proc = _start(device)
    try:
        first = _wait_armed(device, proc)
        time.sleep(1.0)
        assert proc.poll() is None  # it does not exit (a close could stop some drivers)
        assert _record(device)["last_keepalive"] == first["last_keepalive"]  # never fed again
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1
    assert "did not reach boot-check within 10 s ([watchdog] trial_deadline)" in err
    assert "it resets the board" in err
