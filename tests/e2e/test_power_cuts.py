"""Power cut at named points of an install (also one that replaces a pending
update) and of the boot assessment (commit, failed health check, rollback): the
agent runs as a real process and SIGKILLs itself at the point
(EDGE_OTA_CRASHPOINT), then the device powers on. Whatever the point, the
device boots a good slot, the booted slot's file is untouched, the agent
reports a state consistent with the slots (never the old pending image under
the new bundle's name, never a lost rollback reason), and the next install
works. tests/powercut explores every cut with unsynced writes dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from agent.crashpoint import ENV
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, DeviceFactory, Images


def killed_at(point: str, device: SimDevice, *argv: str) -> None:
    env = {**os.environ, ENV: point}
    cmd = [sys.executable, "-m", "agent.cli", "-c", str(device.config), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr.decode())


def fail_health(device: SimDevice) -> None:
    """Make the device's health check fail (a real command that exits 1)."""
    config = device.config.read_text().replace("commands = []", 'commands = [["false"]]')
    device.config.write_text(config.replace("deadline = 30", "deadline = 1"))


def events(device: SimDevice, txn: str | None = None) -> list[tuple[str, str]]:
    return [(e["event"], e["result"]) for e in device.outbox() if txn is None or e["txn"] == txn]


def pending_txn(device: SimDevice) -> str:
    trial = device.status()["trial"]
    assert trial is not None
    txn: str = trial["txn"]
    return txn


@pytest.mark.parametrize("point", ["after-trial-saved", "mid-payload", "before-read-back"])
def test_power_cut_during_install_keeps_the_booted_slot_and_reports_the_interrupted_install(
    device: SimDevice, make_bundle: BundleFactory, point: str
) -> None:
    bundle = make_bundle("2.0", security_version=2)
    booted_before = device.snapshot().slot("A")
    killed_at(point, device, "install", str(bundle))

    device.boot()
    status = device.status()
    assert status["booted"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert status["slots"]["B"]["version"] is None
    assert status["trial"] is None
    last = status["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert "interrupted" in last["reason"]
    assert device.snapshot().slot("A") == booted_before

    device.install_ok(bundle)
    device.boot()
    assert device.status()["booted"] == "B"


def test_power_cut_after_marking_the_target_bad_leaves_its_record_true_to_its_contents(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    bundle = make_bundle("2.0", security_version=2)
    killed_at("after-mark-bad", device, "install", str(bundle))

    device.boot()
    status = device.status()
    assert status["booted"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert status["trial"] is None
    # Nothing was written yet: B still holds the factory image its record names.
    assert status["slots"]["B"]["sha256"] == images.factory.sha256
    assert device.slot_image_sha256("B", images.factory.size) == images.factory.sha256
    device.install_ok(bundle)
    device.boot()
    assert device.status()["slots"]["B"]["version"] == "2.0"


@pytest.mark.parametrize("point", ["after-cancel-pending", "after-mark-bad", "after-trial-saved", "mid-payload"])
def test_power_cut_while_replacing_a_pending_update_never_commits_the_old_image_as_the_new_one(
    device: SimDevice, make_bundle: BundleFactory, images: Images, point: str
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    old_txn = pending_txn(device)
    killed_at(point, device, "install", str(make_bundle("3.0", security_version=3, image=images.v3)))

    device.boot()
    status = device.status()
    # The old pending update was cancelled, not tried, not committed, not "rolled back".
    assert status["booted"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert status["committed_security_version"] == 0
    assert status["trial"] is None
    assert ("install", "cancelled") in events(device, old_txn)
    assert ("commit", "ok") not in events(device, old_txn)
    assert all(event != "rollback" for event, _ in events(device))
    record = status["slots"]["B"]
    if record["sha256"] is not None:  # a record left in place still names what B holds
        assert record["sha256"] == images.v2.sha256
        assert device.slot_image_sha256("B", images.v2.size) == images.v2.sha256

    device.install_ok(make_bundle("3.0", security_version=3, image=images.v3))
    device.boot()
    status = device.status()
    assert (status["booted"], status["slots"]["B"]["version"]) == ("B", "3.0")
    assert status["committed_security_version"] == 3


def test_replacing_a_pending_update_reports_it_cancelled_and_installs_the_new_one(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    old_txn = pending_txn(device)
    device.install_ok(make_bundle("3.0", security_version=3, image=images.v3))
    assert events(device, old_txn) == [("install", "started"), ("install", "ok"), ("install", "cancelled")]

    device.boot()
    status = device.status()
    assert (status["booted"], status["slots"]["B"]["version"]) == ("B", "3.0")
    assert status["slots"]["B"]["sha256"] == images.v3.sha256
    assert device.slot_image_sha256("B", images.v3.size) == images.v3.sha256
    assert status["committed_security_version"] == 3


def test_power_cut_after_the_slot_was_made_primary_still_tries_and_commits_it(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    killed_at("after-set-primary", device, "install", str(make_bundle("2.0", security_version=2)))
    run = device.boot()
    assert "trial boot" in run.out
    status = device.status()
    assert status["booted"] == "B"
    assert status["slots"]["B"]["boot_state"] == "good"
    assert status["slots"]["B"]["version"] == "2.0"
    assert status["slots"]["B"]["sha256"] == images.v2.sha256
    assert status["committed_security_version"] == 2
    record = json.loads((device.dir / "state" / "state.json").read_text())["slots"]["B"]
    assert record["images"] == {"rootfs": images.v2.sha256}, "every image's hash, as a completed install records"


def test_power_cut_right_after_commit_in_the_bootloader_completes_the_commit_on_next_boot(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    device.power_on_without_boot_check()  # the firmware picks B for its trial
    killed_at("after-mark-good", device, "boot-check", "--no-reboot")
    assert device.status()["committed_security_version"] == 0  # the cut came before the state was saved

    run = device.boot()
    assert "committed slot" in run.out
    status = device.status()
    assert status["booted"] == "B"
    assert status["committed_security_version"] == 2
    assert status["trial"] is None
    assert status["last_result"]["event"] == "commit"


def test_power_cut_after_a_failed_health_check_still_falls_back(device: SimDevice, make_bundle: BundleFactory) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    device.power_on_without_boot_check()
    fail_health(device)
    killed_at("after-mark-bad-trial", device, "boot-check", "--no-reboot")

    device.boot()
    status = device.status()
    assert status["booted"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert status["last_result"]["event"] == "rollback"
    assert status["trial"] is None
    assert "failed its health checks" in status["last_result"]["reason"]


def test_power_cut_after_saving_a_failed_health_check_keeps_the_verdict_and_its_reason(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    device.power_on_without_boot_check()
    fail_health(device)
    killed_at("after-trial-failure-saved", device, "boot-check", "--no-reboot")
    assert device.status()["slots"]["B"]["boot_state"] == "trial"  # the cut came before mark-bad

    run = device.boot()
    # B still has tries: the firmware boots it again, and boot-check finishes the verdict.
    assert "slot B failed its health checks: health check `false`" in run.out
    status = device.status()
    assert status["booted"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    last = status["last_result"]
    assert (last["event"], last["result"]) == ("rollback", "rolled-back")
    assert "failed its health checks: health check `false`" in last["reason"]
    assert status["trial"] is None


@pytest.mark.parametrize("tries", [1, 3])
def test_power_cut_while_recording_a_rollback_keeps_its_reason(
    make_device: DeviceFactory, make_bundle: BundleFactory, tries: int
) -> None:
    device = make_device(tries=tries)
    device.install_ok(make_bundle("2.0", security_version=2))
    if tries == 1:  # B used its only try without committing; the firmware falls back to A
        device.power_on_without_boot_check()
        expected = "did not commit within 1 boot attempts"
    else:  # B failed its health checks and was marked bad
        device.power_on_without_boot_check()
        fail_health(device)
        assert device.agent("boot-check", "--no-reboot").rc == 1
        expected = "failed its health checks: health check `false`"
    assert device.power_on_without_boot_check().slot == "A"
    killed_at("after-rollback-recorded", device, "boot-check", "--no-reboot")

    device.boot()
    status = device.status()
    assert status["booted"] == "A"
    assert not status["slots"]["B"]["bootable"]
    last = status["last_result"]
    assert (last["event"], last["result"]) == ("rollback", "rolled-back")
    assert expected in last["reason"]
    assert "was not booted" not in last["reason"]
    assert status["trial"] is None


def test_an_install_after_a_cut_mid_commit_waits_for_boot_check_so_the_floor_raise_is_kept(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    device.power_on_without_boot_check()
    killed_at("after-mark-good", device, "boot-check", "--no-reboot")
    refused = device.install(make_bundle("3.0", security_version=3)).one_error_line()
    assert "commit of slot B (version 2.0) is not finished; run boot-check first" in refused
    device.boot()
    assert device.status()["committed_security_version"] == 2
    device.install_ok(make_bundle("3.0", security_version=3))
