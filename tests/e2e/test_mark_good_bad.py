"""Operator overrides: `mark-bad` / `mark-good` on `other`, `booted` or a
bootname, each recorded; an unknown name is one clear error changing nothing.
mark-bad of a slot with a pending update cancels the update (or, on the booted
trial slot, has the next boot report its rollback with the operator's reason)."""

from __future__ import annotations

import pytest

from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


def test_mark_bad_other_makes_the_inactive_slot_unbootable(device: SimDevice) -> None:
    a_before = device.snapshot().boot_doc()["slots"]["A"]
    run = device.agent("mark-bad", "other")
    assert run.rc == 0, run.err
    assert run.out.strip() == "slot B: marked bad"
    doc = device.status()
    assert doc["slots"]["B"]["boot_state"] == "bad"
    assert doc["slots"]["B"]["bootable"] is False
    assert doc["primary"] == "A"
    assert device.snapshot().boot_doc()["slots"]["A"] == a_before
    last = doc["last_result"]
    assert (last["event"], last["result"], last["slot"]) == ("mark-bad", "ok", "B")
    # A power-on still boots A and never tries B.
    assert device.boot().out.splitlines()[-1] == "settled on slot A after 1 boot(s)"


def test_mark_good_other_makes_a_bad_slot_bootable_again(device: SimDevice) -> None:
    device.agent("mark-bad", "other")
    run = device.agent("mark-good", "other")
    assert run.rc == 0, run.err
    assert run.out.strip() == "slot B: marked good"
    doc = device.status()
    assert doc["slots"]["B"]["boot_state"] == "good"
    assert doc["slots"]["B"]["bootable"] is True
    assert doc["last_result"]["event"] == "mark-good"


def test_mark_bad_by_bootname_cancels_a_pending_trial_before_it_boots(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0"))
    assert device.status()["primary"] == "B"
    run = device.agent("mark-bad", "B")
    assert run.rc == 0, run.err
    doc = device.status()
    assert doc["primary"] == "A"
    assert doc["slots"]["B"]["boot_state"] == "bad"
    assert device.boot().out.splitlines()[0].startswith("boot 1: slot A")
    assert device.status()["booted"] == "A"


def test_mark_good_by_bootname_commits_a_slot_without_a_trial(device: SimDevice, make_bundle: BundleFactory) -> None:
    device.install_ok(make_bundle("2.0"))
    run = device.agent("mark-good", "B")
    assert run.rc == 0, run.err
    doc = device.status()
    assert doc["slots"]["B"]["boot_state"] == "good"
    assert doc["primary"] == "B"  # install put it first in the order
    assert device.boot().out.splitlines()[0].startswith("boot 1: slot B (committed slot)")


def test_mark_good_without_argument_marks_the_booted_slot(device: SimDevice, make_bundle: BundleFactory) -> None:
    device.install_ok(make_bundle("2.0"))
    device.power_on_without_boot_check()  # B boots on trial, boot-check never ran
    assert device.status()["booted"] == "B"
    run = device.agent("mark-good")
    assert run.rc == 0, run.err
    assert run.out.strip() == "slot B: marked good; committed (security version now 1)"
    assert device.status()["slots"]["B"]["boot_state"] == "good"


def test_mark_bad_of_a_pending_update_cancels_it_and_the_next_boot_reports_no_rollback(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0"))
    run = device.agent("mark-bad", "other")
    assert run.rc == 0, run.err
    doc = device.status()
    assert doc["trial"] is None
    assert "pending update to version 2.0 is cancelled" in doc["last_result"]["reason"]
    outbox_before = len(device.outbox())
    assert device.boot().out.splitlines()[-1] == "settled on slot A after 1 boot(s)"
    assert device.outbox()[outbox_before:] == []  # nothing to roll back: it never booted


def test_mark_bad_of_the_booted_trial_slot_is_reported_as_its_rollback_with_the_operators_reason(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0"))
    device.power_on_without_boot_check()  # B runs on trial
    run = device.agent("mark-bad")
    assert run.rc == 0, run.err
    assert device.status()["committed_security_version"] == 0
    assert device.boot().out.splitlines()[-1] == "settled on slot A after 1 boot(s)"
    last = device.status()["last_result"]
    assert (last["event"], last["result"], last["slot"]) == ("rollback", "rolled-back", "B")
    assert "marked bad by operator" in last["reason"]


@pytest.mark.parametrize("verb", ["mark-good", "mark-bad"])
@pytest.mark.parametrize("name", ["C", "a", ""])
def test_unknown_bootname_is_one_clear_error_and_changes_nothing(device: SimDevice, verb: str, name: str) -> None:
    before = device.snapshot()
    line = device.agent(verb, name).one_error_line()
    assert f"unknown slot {name!r}" in line
    assert "booted, other or one of A, B" in line
    after = device.snapshot()
    assert after.bootloader == before.bootloader
    assert after.small == before.small


def test_marking_the_booted_slot_bad_with_no_other_bootable_slot_needs_force(device: SimDevice) -> None:
    assert device.agent("mark-bad", "B").rc == 0
    before = device.snapshot()
    line = device.agent("mark-bad", "A").one_error_line()
    assert "no other slot can boot" in line
    assert "--force" in line
    assert device.snapshot().bootloader == before.bootloader
    assert device.agent("mark-bad", "A", "--force").rc == 0
    assert device.status()["slots"]["A"]["boot_state"] == "bad"
