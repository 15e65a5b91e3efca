"""The pure core on shared fakes (tests/fakes): install planning, install policy,
boot assessment, and the application layer's rollback, with no process, no
subprocess and no real bootloader."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from agent.actions import App
from agent.bootcheck import HealthOverride, Outcome, boot_check
from agent.commands import CommandError, check_args, execute, lookup
from agent.config import SlotConfig
from agent.errors import BusyError, DowngradeError, ExpiredError, IncompatibleError, MarkError, PlanError
from agent.jobs import JobContext, JobQueue
from agent.plan import make_plan
from agent.policy import check
from agent.state import SlotRecord, Trial
from bundler.format.header import Header
from bundler.format.manifest import ImageEntry, Manifest
from bundler.format.signing import VerifiedBundle
from hw.bootloader import model
from hw.bootloader.model import SlotBootState
from tests.fakes.device import NOW, FakeDevice, fake_device

DIGEST = "ab" * 32


def bundle(*, classes: tuple[str, ...] = ("rootfs",), size: int = 4096, security_version: int = 2,
           compatible: str = "unit-board", expires_in: timedelta | None = None) -> VerifiedBundle:
    images = tuple(ImageEntry(c, size, DIGEST, i, 1) for i, c in enumerate(classes))
    manifest = Manifest("2.0", security_version, compatible, NOW, NOW + expires_in if expires_in else None, images,
                        len(images), DIGEST, 0)
    return VerifiedBundle(Header(100, 102, len(images), 0), manifest, b"k" * 32)


SLOTS = (SlotConfig("A", "rootfs", Path("/a")), SlotConfig("B", "rootfs", Path("/b")),
         SlotConfig("A", "appfs", Path("/a2")), SlotConfig("B", "appfs", Path("/b2")))
CAPACITY = {(s.slot_class, s.bootname): 8192 for s in SLOTS}


# --- plan ---------------------------------------------------------------------


def test_plan_targets_the_other_bootname_with_one_slot_per_image() -> None:
    plan = make_plan(bundle(classes=("rootfs", "appfs")), SLOTS, "A", CAPACITY)
    assert plan.target == "B"
    assert [(ip.image.slot_class, ip.slot.path) for ip in plan.images] == [("rootfs", Path("/b")),
                                                                          ("appfs", Path("/b2"))]


@pytest.mark.parametrize(
    ("kwargs", "booted", "message"),
    [({"classes": ("kernel",)}, "A", "slot class 'kernel'"), ({"size": 9000}, "A", "holds only 8192"),
     ({}, "C", "booted slot 'C' is not configured")],
)
def test_plan_refuses_what_does_not_fit(kwargs: dict[str, object], booted: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        make_plan(bundle(**kwargs), SLOTS, booted, CAPACITY)  # type: ignore[arg-type]


# --- policy -------------------------------------------------------------------


def test_policy_accepts_a_compatible_current_bundle_at_or_above_the_floor() -> None:
    check(bundle(security_version=2), compatible="unit-board", security_floor=2, now=NOW)


def test_policy_refuses_incompatible_downgraded_and_expired_bundles() -> None:
    with pytest.raises(IncompatibleError):
        check(bundle(compatible="other-board"), compatible="unit-board", security_floor=0, now=NOW)
    with pytest.raises(DowngradeError):
        check(bundle(security_version=1), compatible="unit-board", security_floor=2, now=NOW)
    check(bundle(security_version=1), compatible="unit-board", security_floor=2, now=NOW, allow_downgrade=True)
    with pytest.raises(ExpiredError):
        check(bundle(expires_in=timedelta(seconds=-1)), compatible="unit-board", security_floor=0, now=NOW)


# --- boot assessment -------------------------------------------------------------


def pending_trial(fake: FakeDevice, slot: str = "B", security_version: int = 5) -> None:
    d = fake.device
    d.bootloader.set_primary(slot, 3)
    state = d.store.load()
    trial = Trial(slot, "txn1", "2.0", security_version, DIGEST, installed=True)
    d.store.save(replace(state.with_slot(slot, SlotRecord("2.0", DIGEST, security_version)), trial=trial))


def power_on(fake: FakeDevice) -> str:
    """The firmware's half: count, choose, pass the slot on the command line."""
    state, decision = model.choose(fake.env.load())
    fake.env.store(state)
    fake.boot_into(decision.slot)
    return decision.slot


def test_a_healthy_trial_commits_and_raises_the_floor(tmp_path: Path) -> None:
    fake = fake_device(tmp_path)
    pending_trial(fake)
    assert power_on(fake) == "B"
    outcome = boot_check(fake.device, health=HealthOverride.OK)
    assert outcome.outcome is Outcome.COMMITTED
    assert fake.device.store.load().committed_security_version == 5
    assert fake.env.load().slots["B"].state is SlotBootState.GOOD


def test_a_failing_trial_saves_its_reason_marks_bad_and_asks_for_a_reboot(tmp_path: Path) -> None:
    fake = fake_device(tmp_path)
    pending_trial(fake)
    power_on(fake)
    outcome = boot_check(fake.device, health=HealthOverride.FAIL)
    assert outcome.reboot
    assert fake.env.load().slots["B"].state is SlotBootState.BAD
    trial = fake.device.store.load().trial
    assert trial is not None
    assert trial.failure == "health checks forced to fail"
    assert power_on(fake) == "A"
    back = boot_check(fake.device)
    assert back.outcome is Outcome.ROLLED_BACK
    assert "health checks forced to fail" in back.reason
    assert fake.device.store.load().committed_security_version == 0


def test_a_pending_trial_not_yet_booted_is_left_alone(tmp_path: Path) -> None:
    fake = fake_device(tmp_path)
    pending_trial(fake)
    before = fake.env.load()
    assert boot_check(fake.device).outcome is Outcome.PENDING
    assert fake.env.load() == before


def test_an_interrupted_install_is_reported_and_its_slot_stays_unbootable(tmp_path: Path) -> None:
    fake = fake_device(tmp_path)
    d = fake.device
    d.bootloader.mark_bad("B")
    d.store.save(replace(d.store.load(), trial=Trial("B", "txn2", "3.0", 3)))
    outcome = boot_check(d)
    assert "interrupted" in outcome.reason
    assert d.store.load().trial is None
    assert fake.env.load().slots["B"].state is SlotBootState.BAD


# --- the application layer ---------------------------------------------------------


def test_rollback_tries_the_other_slot_whose_content_is_known_and_reboots(tmp_path: Path) -> None:
    fake = fake_device(tmp_path)
    d = fake.device
    d.store.save(d.store.load().with_slot("B", SlotRecord("1.0", DIGEST, 0)))
    app = App(d, rebooter=fake.rebooter)
    reply = execute(app, "rollback", {}, origin="test")
    assert reply.ok, reply.error
    assert reply.result is not None
    assert reply.result["slot"] == "B"
    assert fake.reboots == 1
    assert model.next_boot(fake.env.load()) == "B"
    trial = d.store.load().trial
    assert trial is not None
    assert (trial.slot, trial.installed) == ("B", True)
    power_on(fake)
    assert boot_check(d, health=HealthOverride.OK).outcome is Outcome.COMMITTED


def test_rollback_is_refused_to_a_slot_of_unknown_content_bad_or_below_the_floor(tmp_path: Path) -> None:
    fake = fake_device(tmp_path)
    d = fake.device
    app = App(d, rebooter=fake.rebooter)
    ctx = JobContext(JobQueue(), "j1")
    with pytest.raises(MarkError, match="content is unknown"):
        app.rollback(ctx)
    d.store.save(replace(d.store.load().with_slot("B", SlotRecord("1.0", DIGEST, 1)), committed_security_version=3))
    with pytest.raises(MarkError, match="below the committed 3"):
        app.rollback(ctx)
    d.bootloader.mark_bad("B")
    with pytest.raises(MarkError, match="marked bad"):
        app.rollback(ctx, allow_downgrade=True)
    assert fake.reboots == 0


def test_a_state_changing_command_while_a_job_runs_is_busy(tmp_path: Path) -> None:
    fake = fake_device(tmp_path)
    app = App(fake.device, rebooter=fake.rebooter)
    release = threading.Event()
    running = app.queue.submit("install", lambda ctx: release.wait(10), origin="test")
    try:
        with pytest.raises(BusyError, match=running.id):
            execute(app, "mark-bad", {"slot": "B"}, origin="test")
        status = execute(app, "status", {}, origin="test")  # read-only: allowed while busy
        assert status.result is not None
        assert status.result["job"]["id"] == running.id
    finally:
        release.set()


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [("install", {}, "'source' is required"), ("install", {"source": 7}, "must be a string"),
     ("mark-good", {"force": "yes"}, "must be true or false"), ("status", {"x": 1}, "unknown argument 'x'"),
     ("format-disk", {}, "unknown command")],
)
def test_bad_commands_and_arguments_are_one_clear_error(name: str, args: dict[str, object], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        check_args(lookup(name), args)
