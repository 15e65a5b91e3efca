"""A new slot that never gets as far as boot-check (it hangs, the watchdog or
the user power-cycles it): each power-on spends one try; once the tries are
used up the bootloader boots the committed slot again, and that slot's
boot-check records the rollback."""

from __future__ import annotations

import json

import pytest

from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, DeviceFactory


@pytest.mark.parametrize("tries", [1, 3])
def test_trial_slot_that_never_commits_falls_back_after_its_tries(
    make_device: DeviceFactory, make_bundle: BundleFactory, tries: int
) -> None:
    dev: SimDevice = make_device(tries=tries)
    dev.install_ok(make_bundle("2.0", security_version=3))
    a_before = dev.snapshot().slot("A")

    for n in range(tries):
        decision = dev.power_on_without_boot_check()
        assert decision.slot == "B", f"power-on {n + 1}"
        assert decision.trial
        boot = json.loads((dev.dir / "bootloader.json").read_bytes())
        assert boot["slots"]["B"] == {"state": "trial", "tries_left": tries - n - 1}
        assert boot["slots"]["A"] == {"state": "good", "tries_left": 0}

    run = dev.boot()  # next power-on, this time boot-check runs
    assert run.out.splitlines()[0].startswith("boot 1: slot A (committed slot)")
    assert run.out.splitlines()[-1] == "settled on slot A after 1 boot(s)"

    doc = dev.status()
    assert doc["booted"] == "A"
    assert doc["primary"] == "A"
    assert doc["slots"]["B"]["boot_state"] == "bad"
    assert doc["slots"]["A"]["boot_state"] == "good"
    assert doc["committed_security_version"] == 0
    assert doc["trial"] is None
    last = doc["last_result"]
    assert (last["event"], last["result"], last["slot"], last["bundle_version"]) == (
        "rollback",
        "rolled-back",
        "B",
        "2.0",
    )
    assert f"did not commit within {tries} boot attempts" in last["reason"]
    assert dev.snapshot().slot("A") == a_before

    # Further power-ons stay on A and report nothing new.
    outbox_len = len(dev.outbox())
    run = dev.boot()
    assert run.out.splitlines()[-1] == "settled on slot A after 1 boot(s)"
    assert len(dev.outbox()) == outbox_len


def test_power_ons_without_a_pending_trial_change_no_bootloader_state(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    """Power-ons on the committed slot (no trial pending) never count anything down."""
    before = device.snapshot()
    for _ in range(5):
        assert device.power_on_without_boot_check().slot == "A"
    assert device.snapshot().bootloader == before.bootloader
