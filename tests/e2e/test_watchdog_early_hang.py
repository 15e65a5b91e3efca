"""A trial boot that hangs before boot-check ever runs (a unit it waits for
blocks): the early trial watchdog armed the simulated hardware watchdog at
power-on and stops feeding it at [watchdog] trial_deadline, so each such boot
ends in a watchdog reset the boot counter counts, the bootloader falls back, and
the rollback report names the watchdog. Without a watchdog the simulator
refuses to pretend: such a boot would hang for ever."""

from __future__ import annotations

import json
import re

from tests.e2e._sim import ERROR_PREFIX, SimDevice
from tests.e2e.conftest import BundleFactory


def test_a_trial_that_blocks_before_boot_check_is_reset_until_the_bootloader_falls_back(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    run = device.boot(health="block")
    lines = [line for line in run.out.splitlines() if line.startswith("boot ")]
    assert [line.split()[3] for line in lines] == ["B", "B", "B", "A"]
    for line in lines[:3]:
        assert "the boot blocked before boot-check" in line
        assert re.search(r"did not reach boot-check within \d+ s \(\[watchdog\] trial_deadline\)", line)
    assert "after a watchdog reset" in lines[1]
    assert "after a watchdog reset" in lines[3]
    assert run.out.count("it resets the board") >= 3

    status = device.status()
    assert status["booted"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert status["slots"]["A"]["boot_state"] == "good"
    assert status["committed_security_version"] == 0
    last = status["last_result"]
    assert last["event"] == "rollback"
    assert "hung and was reset by the watchdog" in last["reason"]
    assert "did not commit within 3 boot attempts" in last["reason"]


def test_a_committed_boot_leaves_the_watchdog_alone(device: SimDevice) -> None:
    run = device.boot(health="block")  # nothing on trial: nothing blocks, nothing is armed
    assert "slot A (" in run.out
    assert "blocked" not in run.out
    wd = device.dir / "watchdog.json"
    assert not wd.exists() or json.loads(wd.read_text())["armed"] is False
    assert "watchdog reset" not in run.out


def test_a_trial_that_boots_normally_is_handed_over_to_boot_check_and_commits(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    run = device.boot()
    assert "watchdog reset" not in run.out
    status = device.status()
    assert status["booted"] == "B"
    assert status["slots"]["B"]["boot_state"] == "good"
    assert status["committed_security_version"] == 2
    record = json.loads((device.dir / "watchdog.json").read_text())
    assert record["armed"] is False  # boot-check took it over and magic-closed it at the commit


def test_a_blocking_trial_without_a_watchdog_is_refused_not_simulated(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    config = device.config.read_text().replace('backend = "sim"\npath = "."', 'backend = "none"\npath = "."')
    assert config != device.config.read_text()
    device.config.write_text(config)
    r = device.run("sim", "boot", str(device.dir), "--health", "block")
    assert r.rc != 0
    assert r.err.startswith(ERROR_PREFIX)
    assert "needs the simulated watchdog" in r.err
