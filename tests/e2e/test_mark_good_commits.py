"""`mark-good` of the booted slot before boot-check committed it is a commit,
the same one boot-check makes: the security floor is raised (so anti-rollback
holds), the slot's contents are recorded, the commit is reported and the trial
is cleared. Two devices, one committed by boot-check and one by the operator,
end in the same state."""

from __future__ import annotations

import json
from typing import Any

from tests.e2e._procs import killed_at
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, DeviceFactory, Images


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """A status document without what differs between two devices or two runs."""
    doc = json.loads(json.dumps(doc))
    for slot in doc["slots"].values():
        slot.pop("path")
        slot.pop("paths")
        slot.pop("installed")
    last = doc.pop("last_result")
    doc["last"] = (last["event"], last["result"], last["slot"], last["bundle_version"])
    return doc


def test_mark_good_of_the_booted_trial_slot_commits_exactly_like_boot_check(
    make_device: DeviceFactory, make_bundle: BundleFactory
) -> None:
    bundle = make_bundle("2.0", security_version=5)
    by_boot_check = make_device(name="by-boot-check")
    by_boot_check.install_ok(bundle)
    by_boot_check.boot()

    by_operator = make_device(name="by-operator")
    by_operator.install_ok(bundle)
    by_operator.power_on_without_boot_check()  # B runs on trial, boot-check never ran
    run = by_operator.agent("mark-good")
    assert run.rc == 0, run.err
    assert run.out.strip() == "slot B: marked good; committed (security version now 5)"

    doc = by_operator.status()
    assert doc["committed_security_version"] == 5
    assert doc["trial"] is None
    assert (doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("good", "2.0")
    assert doc["last_result"]["reason"] == "slot B marked good by operator; committed (security version now 5)"
    assert comparable(doc) == comparable(by_boot_check.status())
    assert [e["event"] for e in by_operator.outbox()][-1] == "commit"


def test_anti_rollback_holds_after_the_operator_committed_by_mark_good(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    device.install_ok(make_bundle("2.0", security_version=5))
    device.power_on_without_boot_check()
    assert device.agent("mark-good", "booted").rc == 0
    line = device.install(make_bundle("3.0", security_version=4, image=images.v3)).one_error_line()
    assert "security version 4 is below the committed security version 5" in line


def test_mark_good_after_a_power_cut_before_the_install_was_recorded_records_the_slot_from_the_trial(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    killed_at("after-set-primary", device, "install", str(make_bundle("2.0", security_version=3)))
    device.power_on_without_boot_check()
    run = device.agent("mark-good", "--json")
    assert run.rc == 0, run.err
    result = json.loads(run.out)
    assert (result["slot"], result["committed"], result["committed_security_version"]) == ("B", True, 3)
    doc = device.status()
    assert (doc["slots"]["B"]["version"], doc["slots"]["B"]["sha256"]) == ("2.0", images.v2.sha256)
    assert doc["trial"] is None


def test_mark_good_of_a_booted_slot_that_failed_its_health_checks_commits_it(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    device.power_on_without_boot_check()
    text = device.config.read_text().replace("commands = []", 'commands = [["false"]]')
    device.config.write_text(text.replace("deadline = 30", "deadline = 1"))
    assert device.agent("boot-check", "--no-reboot").rc == 1  # B marked bad, reboot skipped
    run = device.agent("mark-good")
    assert run.rc == 0, run.err
    doc = device.status()
    assert (doc["slots"]["B"]["boot_state"], doc["committed_security_version"], doc["trial"]) == ("good", 2, None)
    assert device.agent("boot-check").rc == 0


def test_mark_good_of_a_committed_booted_slot_changes_no_commit_state(device: SimDevice) -> None:
    before = device.snapshot()
    run = device.agent("mark-good")
    assert run.rc == 0, run.err
    assert run.out.strip() == "slot A: marked good"
    after = device.snapshot()
    assert after.bootloader == before.bootloader
    assert after.agent_state()["committed_security_version"] == 0
    assert "already committed" in after.agent_state()["last_result"]["reason"]
