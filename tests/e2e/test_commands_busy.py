"""Every state-changing command takes the agent's state lock. While another
process holds it (as a running install does), mark-good, mark-bad and install
answer busy: one clear error line, exit 1, nothing changed. Once the lock is
free the same command works."""

from __future__ import annotations

import json

import pytest

from tests.e2e._procs import state_lock_held
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, Images


@pytest.mark.parametrize(
    ("argv", "verdict"),
    [(("mark-good", "other"), "good"), (("mark-bad", "other"), "bad"), (("mark-bad", "B"), "bad")],
)
def test_mark_while_the_state_lock_is_held_answers_busy_and_changes_nothing(
    device: SimDevice, make_bundle: BundleFactory, argv: tuple[str, ...], verdict: str
) -> None:
    device.install_ok(make_bundle("2.0"))  # a pending update in B: the slot an install would be writing
    before = device.snapshot()
    with state_lock_held(device):
        line = device.agent(*argv).one_error_line()
    assert f"busy: slot B not marked {verdict}" in line
    assert "holds the state lock" in line
    assert "try again when it has finished" in line
    after = device.snapshot()
    assert after.bootloader == before.bootloader
    assert after.small == before.small
    run = device.agent(*argv)
    assert run.rc == 0, run.err


def test_mark_good_of_the_booted_trial_slot_while_busy_does_not_commit(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=3))
    device.power_on_without_boot_check()
    before = device.snapshot()
    with state_lock_held(device):
        run = device.agent("mark-good", "--json")
    assert run.rc == 1
    assert run.out == ""
    assert "busy: slot B not marked good" in json.loads(run.err)["error"]["message"]
    assert device.snapshot().small == before.small
    assert device.status()["committed_security_version"] == 0


def test_install_while_the_state_lock_is_held_answers_busy_and_writes_nothing(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    before = device.snapshot()
    with state_lock_held(device):
        line = device.install(make_bundle("3.0", image=images.v3)).one_error_line()
    assert "busy: another ota-agent command (an install, boot-check or mark) is in progress" in line
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B"))
    assert after.bootloader == before.bootloader
    assert after.small["state/state.json"] == before.small["state/state.json"]
