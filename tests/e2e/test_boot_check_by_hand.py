"""`boot-check` run when the device did not just boot a trial: by hand after an
install but before the reboot, a second time after a failed trial, or while the
booted slot is not committed for any other reason.

A pending update that was never booted is left alone (exit 0, nothing changed),
and the next power-on still tries and commits it. Whenever the booted slot is
not good once boot-check is done, it exits non-zero with a line saying so, so
that boot-complete.target (and systemd-bless-boot's "good") is not reached.
"""

from __future__ import annotations

import pytest

from tests.e2e._procs import state_lock_held
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


def assert_unchanged_and_then_committed_by_the_next_boot(device: SimDevice, before_state: bytes) -> None:
    snap = device.snapshot()
    assert snap.small["state/state.json"] == before_state
    run = device.boot()
    assert run.out.splitlines()[-1] == "settled on slot B after 1 boot(s)"
    doc = device.status()
    assert (doc["booted"], doc["slots"]["B"]["boot_state"], doc["committed_security_version"]) == ("B", "good", 4)
    assert doc["last_result"]["event"] == "commit"


def test_boot_check_by_hand_before_the_reboot_leaves_the_untried_update_pending(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=4))
    before = device.snapshot()
    run = device.agent("boot-check", "--no-reboot")
    assert run.rc == 0, run.out + run.err
    assert run.out.startswith("boot-check: pending: version 2.0 is installed in slot B and has not been booted yet")
    assert "reboot to try it" in run.out
    after = device.snapshot()
    assert after.bootloader == before.bootloader
    assert after.small == before.small  # state, outbox: nothing recorded, nothing changed
    assert_unchanged_and_then_committed_by_the_next_boot(device, before.small["state/state.json"])


def test_boot_check_by_hand_leaves_an_update_the_operator_marked_good_before_its_first_boot(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=4))
    assert device.agent("mark-good", "other").rc == 0
    before = device.snapshot()
    run = device.agent("boot-check")
    assert run.rc == 0, run.out + run.err
    assert run.out.startswith("boot-check: pending:")
    assert device.snapshot().bootloader == before.bootloader
    assert device.status()["slots"]["B"]["boot_state"] == "good"
    assert_unchanged_and_then_committed_by_the_next_boot(device, before.small["state/state.json"])


def fail_health_checks(device: SimDevice) -> None:
    text = device.config.read_text().replace("commands = []", 'commands = [["false"]]')
    text = text.replace("deadline = 30", "deadline = 1")
    device.config.write_text(text)


def test_second_boot_check_on_a_booted_slot_already_marked_bad_exits_non_zero(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0"))
    device.power_on_without_boot_check()  # B runs on trial
    fail_health_checks(device)
    first = device.agent("boot-check", "--no-reboot")
    assert first.rc == 1
    assert first.out.startswith("boot-check: failed-reboot:")
    before = device.snapshot()
    second = device.agent("boot-check", "--no-reboot")
    assert second.rc == 1, second.out
    assert second.out.splitlines() == [
        "boot-check: not-good: booted slot B is bad, not committed: not reaching boot-complete; "
        "reboot into a good slot, or ota-agent mark-good if you know this one is good"
    ]
    assert device.snapshot().small == before.small
    # The reboot the first check asked for still lands on A.
    assert device.boot().out.splitlines()[-1] == "settled on slot A after 1 boot(s)"


def test_boot_check_on_a_booted_slot_the_operator_marked_bad_exits_non_zero(device: SimDevice) -> None:
    assert device.agent("mark-bad", "booted").rc == 0
    run = device.agent("boot-check", "--json")
    assert run.rc == 1
    assert '"outcome": "not-good"' in run.out
    assert '"booted_good": false' in run.out


def test_boot_check_that_cannot_assess_a_booted_trial_slot_while_busy_exits_non_zero(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0"))
    device.power_on_without_boot_check()  # B runs on trial
    before = device.snapshot()
    with state_lock_held(device):
        run = device.agent("boot-check", "--no-reboot")
    assert run.rc == 1, run.out
    assert run.out.startswith("boot-check: busy: another ota-agent command")
    assert "booted slot B is on trial, 2 tries left, not committed" in run.out
    assert device.snapshot().small == before.small


def test_boot_check_on_a_good_booted_slot_while_busy_exits_zero(device: SimDevice) -> None:
    with state_lock_held(device):
        run = device.agent("boot-check")
    assert run.rc == 0, run.out
    assert run.out.startswith("boot-check: busy:")


@pytest.mark.parametrize("cmdline", ["", "root=/dev/mmcblk0p2 quiet\n"])
def test_boot_check_without_a_slot_marker_is_one_error_line_and_exits_non_zero(
    device: SimDevice, cmdline: str
) -> None:
    (device.dir / "cmdline").write_text(cmdline)
    line = device.agent("boot-check").one_error_line()
    assert "no ota.slot= or rauc.slot= on the kernel command line" in line
