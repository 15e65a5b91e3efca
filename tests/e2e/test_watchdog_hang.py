"""A trial boot that hangs: the simulated hardware watchdog resets the board,
the boot counter runs out, the bootloader falls back, and the rollback report
names the watchdog."""

from __future__ import annotations

import json

from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


def watchdog_record(device: SimDevice) -> dict[str, object]:
    doc: dict[str, object] = json.loads((device.dir / "watchdog.json").read_text())
    return doc


def test_hang_during_trial_is_reset_by_watchdog_until_the_bootloader_falls_back(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    run = device.boot(health="hang")
    lines = [line for line in run.out.splitlines() if line.startswith("boot ")]
    assert [line.split()[3] for line in lines] == ["B", "B", "B", "A"]
    assert "after a watchdog reset" in lines[1]
    assert "after a watchdog reset" in lines[3]
    assert run.out.count("it resets the board") == 3

    status = device.status()
    assert status["booted"] == "A"
    assert status["primary"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert status["committed_security_version"] == 0
    last = status["last_result"]
    assert last["event"] == "rollback"
    assert "watchdog" in last["reason"]
    assert "did not commit within 3 boot attempts" in last["reason"]
    assert [e["event"] for e in device.outbox()][-1] == "rollback"


def test_commit_disarms_the_watchdog_with_a_magic_close(device: SimDevice, make_bundle: BundleFactory) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    device.boot()
    record = watchdog_record(device)
    assert record["armed"] is False
    assert record["boot_status"] == 0
    assert device.status()["booted"] == "B"


def test_failed_health_reboot_is_not_mistaken_for_a_watchdog_reset(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    run = device.boot(health="fail")
    assert "watchdog" not in run.out
    reason = device.status()["last_result"]["reason"]
    assert "failed its health checks" in reason
    assert "watchdog" not in reason
