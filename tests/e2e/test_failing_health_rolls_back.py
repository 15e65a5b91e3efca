"""A new slot whose health checks fail: the first boot tries it, boot-check
marks it bad and reboots, the bootloader falls back to the old slot, and the
rollback is reported with the failed check as its reason."""

from __future__ import annotations

from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, Images


def test_failed_health_check_marks_new_slot_bad_and_boots_the_previous_one(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=4))
    a_before = device.snapshot().slot("A")
    run = device.boot(health="fail")
    lines = run.out.splitlines()
    assert lines[0].startswith("boot 1: slot B (trial boot")
    assert "health checks forced to fail" in lines[0]
    assert lines[1].startswith("boot 2: slot A (committed slot)")
    assert lines[-1] == "settled on slot A after 2 boot(s)"

    doc = device.status()
    assert doc["booted"] == "A"
    assert doc["primary"] == "A"
    assert doc["slots"]["A"]["boot_state"] == "good"
    assert doc["slots"]["B"]["boot_state"] == "bad"
    assert doc["slots"]["B"]["bootable"] is False
    assert doc["committed_security_version"] == 0  # a failed trial raises no floor
    assert doc["trial"] is None
    last = doc["last_result"]
    assert (last["event"], last["result"], last["slot"], last["bundle_version"]) == (
        "rollback",
        "rolled-back",
        "B",
        "2.0",
    )
    assert "failed its health checks: health checks forced to fail" in last["reason"]
    assert device.snapshot().slot("A") == a_before

    events = [(e["event"], e["result"]) for e in device.outbox()]
    assert events[-2:] == [("commit", "failed"), ("rollback", "rolled-back")]


def test_a_later_install_after_a_rollback_succeeds_and_commits(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    device.install_ok(make_bundle("2.0", security_version=4))
    device.boot(health="fail")
    device.install_ok(make_bundle("2.1", security_version=4, image=images.v3))
    doc = device.status()
    assert doc["primary"] == "B"
    assert doc["slots"]["B"]["boot_state"] == "trial"
    assert doc["slots"]["B"]["version"] == "2.1"
    run = device.boot()
    assert run.out.splitlines()[-1] == "settled on slot B after 1 boot(s)"
    doc = device.status()
    assert doc["booted"] == "B"
    assert doc["slots"]["B"]["boot_state"] == "good"
    assert doc["committed_security_version"] == 4
    assert doc["last_result"]["event"] == "commit"
    assert device.slot_image_sha256("B", images.v3.size) == images.v3.sha256


def test_a_failing_health_command_from_the_config_rolls_back_naming_the_command(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    """The same flow with a real configured check instead of the override."""
    cfg = device.config.read_text()
    cfg = cfg.replace("deadline = 30\ncommands = []", 'deadline = 1\ncommands = [["false"]]')
    device.config.write_text(cfg)
    device.install_ok(make_bundle("2.0"))
    run = device.boot()
    assert run.out.splitlines()[-1] == "settled on slot A after 2 boot(s)"
    last = device.status()["last_result"]
    assert last["event"] == "rollback"
    assert "health check `false`" in last["reason"]
