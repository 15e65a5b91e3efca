"""What the device runs after every boot (`ota-agent boot-check`).

* Booted slot on trial: run the health checks within the deadline, then commit
  (mark good, raise the committed security version) or mark the slot bad and
  ask for a reboot into the other slot.
* A trial is pending in another slot that the next power-on boots (installed,
  not tried yet: boot-check run by hand before the reboot): left alone.
* A trial was pending but the other slot booted: the bootloader fell back
  (tries exhausted, or we marked it bad): record the rollback and its reason.
* Otherwise nothing.

Whatever happened, the outcome says whether the booted slot is good (committed)
at the end; when it is not, `ota-agent boot-check` exits non-zero so that
boot-complete.target (and systemd-bless-boot's "good") is not reached.

Every verdict is saved before the bootloader acts on it: a failed health check
saves `Trial.failure` and then marks the slot bad; a rollback is recorded before
the fallen-back slot is marked bad; a trial a later install cancelled
(`Trial.cancelled`) is never committed, even when the firmware boots it.

The hardware watchdog is armed for the whole trial assessment and fed by a
background thread only until the health-check deadline: a system that hangs,
or health checks that never finish, stop the feeding and the watchdog resets
the board, after which the bootloader's counter takes over. A commit disarms
it (magic close). When the bootloader fell back after such resets, the
rollback report names the watchdog.

Returns a `BootCheckOutcome`; performing the reboot is the caller's job.
`commit()` is the one commit path: boot-check's success and the operator's
mark-good of the booted slot both end in `_commit`.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, replace

from agent.crashpoint import crashpoint
from agent.daemon import Device
from agent.errors import LockBusyError
from agent.events import Event, EventType, Result
from agent.health import HealthResult
from agent.state import AgentState, SlotRecord, Trial
from hw.bootloader import model
from hw.bootloader.model import BootState, SlotBootState
from hw.watchdog import Watchdog

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    NOTHING = "nothing"
    COMMITTED = "committed"
    FAILED_REBOOT = "failed-reboot"
    ROLLED_BACK = "rolled-back"
    PENDING = "pending"  # an installed update waits in the other slot for the next boot
    NOT_GOOD = "not-good"  # the booted slot is bad (or otherwise not committed) and nothing was assessed
    BUSY = "busy"  # another command holds the state lock
    HUNG = "hung"  # only with HealthOverride.HANG: the simulated system stopped here


class HealthOverride(enum.Enum):
    """Test seam for the simulated device: force the health checks' result.
    BLOCK: a trial boot never gets to boot-check (a unit it waits for blocks);
    the simulator handles it (agent/sim.py), boot-check never sees it."""

    OK = "ok"
    FAIL = "fail"
    HANG = "hang"
    BLOCK = "block"


class _Feeder:
    """Feeds the watchdog from a thread until `until` (monotonic) or until stopped."""

    def __init__(self, watchdog: Watchdog, interval: float, until: float) -> None:
        self.watchdog = watchdog
        self.interval = interval
        self.until = until
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog-feeder", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() >= self.until:
                log.warning("health-check deadline passed: no longer feeding the watchdog")
                return
            self.watchdog.keepalive()

    def __enter__(self) -> _Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True, slots=True)
class BootCheckOutcome:
    outcome: Outcome
    slot: str
    reason: str
    booted_good: bool = True  # the booted slot is committed once boot-check is done

    @property
    def reboot(self) -> bool:
        return self.outcome is Outcome.FAILED_REBOOT


def trial_event(trial: Trial, event: EventType, result: Result, reason: str) -> Event:
    """An event about the update a trial record describes (its txn, version and slot)."""
    return Event(event=event, result=result, reason=reason, txn=trial.txn, bundle_version=trial.bundle_version,
                 slot=trial.slot)


def pending_trial(state: AgentState, boot: BootState, booted: str) -> Trial | None:
    """The installed update waiting in another slot that the next power-on boots
    (not tried yet, or marked good by the operator before its first boot), if any."""
    trial = state.trial
    if trial is None or trial.slot == booted or not trial.installed or trial.failure or trial.cancelled:
        return None
    return trial if model.next_boot(boot) == trial.slot else None


def boot_check(device: Device, *, health: HealthOverride | None = None) -> BootCheckOutcome:
    try:
        with device.store.lock():
            outcome = _boot_check(device, health)
    except LockBusyError:
        booted = device.bootloader.booted_slot()
        outcome = BootCheckOutcome(
            Outcome.BUSY, booted, "another ota-agent command (an install?) holds the state lock; nothing assessed"
        )
    return _with_booted_state(device, outcome)


def _with_booted_state(device: Device, outcome: BootCheckOutcome) -> BootCheckOutcome:
    """Say whether the booted slot is good now; name it in the reason when it is not."""
    slot_boot = device.bootloader.state().slots[outcome.slot]
    if slot_boot.state is SlotBootState.GOOD:
        return outcome
    reason = outcome.reason
    if outcome.outcome not in (Outcome.NOT_GOOD, Outcome.FAILED_REBOOT, Outcome.HUNG):
        reason = f"{reason}; booted slot {outcome.slot} is {slot_boot.describe()}, not committed"
    return replace(outcome, reason=reason, booted_good=False)


def _boot_check(device: Device, health: HealthOverride | None) -> BootCheckOutcome:
    bl = device.bootloader
    booted = bl.booted_slot()
    boot_state = bl.state()
    state = device.store.load()
    trial = state.trial
    slot_boot = boot_state.slots[booted]

    if slot_boot.state is SlotBootState.TRIAL and trial is not None and trial.slot == booted:
        verdict = _verdict(trial)
        if verdict is not None:
            # Decided on an earlier boot (or by a replacing install) and saved before
            # a power cut stopped it from marking the slot bad: finish that now.
            bl.mark_bad(booted)
            return BootCheckOutcome(Outcome.FAILED_REBOOT, booted, f"{verdict}; rebooting into the previous slot")

    if slot_boot.state is SlotBootState.TRIAL:
        wd_cfg = device.config.watchdog
        device.watchdog.start(wd_cfg.timeout)
        if health is HealthOverride.HANG:
            hung = "system hung during the health checks; nothing feeds the watchdog"
            return BootCheckOutcome(Outcome.HUNG, booted, hung)
        with _Feeder(device.watchdog, max(wd_cfg.timeout / 3, 0.5), time.monotonic() + device.config.health.deadline):
            crashpoint("during-health-check")
            result = _health(device, health)
        version = trial.bundle_version if trial and trial.slot == booted else None
        txn = trial.txn if trial and trial.slot == booted else None
        if result.ok:
            bl.mark_good(booted)
            crashpoint("after-mark-good")
            device.watchdog.stop()
            return _commit(device, booted, result.reason)
        # The reason first, durably: the rollback on the next boot reports it.
        if trial and trial.slot == booted:
            state = replace(state, trial=replace(trial, failure=result.reason))
        reason = f"{result.reason}; rebooting into the previous slot"
        device.record(
            Event(
                event=EventType.COMMIT,
                result=Result.FAILED,
                reason=reason,
                txn=txn,
                bundle_version=version,
                slot=booted,
            ),
            state,
        )
        crashpoint("after-trial-failure-saved")
        bl.mark_bad(booted)
        crashpoint("after-mark-bad-trial")
        return BootCheckOutcome(Outcome.FAILED_REBOOT, booted, result.reason)

    if trial is not None and trial.slot == booted and slot_boot.state is SlotBootState.GOOD:
        # Committed in the bootloader, then power was cut before the state was saved.
        return _commit(device, booted, "commit completed after an interruption")

    if trial is not None and trial.slot != booted:
        failed = boot_state.slots[trial.slot]
        if trial.cancelled:
            if failed.state is not SlotBootState.BAD:
                bl.mark_bad(trial.slot)
            reason = f"{trial.cancelled}; slot {trial.slot} stays unbootable, {booted} runs on"
            event = trial_event(trial, EventType.INSTALL, Result.CANCELLED, reason)
            device.record(event, replace(state, trial=None))
            return BootCheckOutcome(Outcome.NOTHING, booted, reason)
        if pending_trial(state, boot_state, booted) is not None:
            reason = (
                f"version {trial.bundle_version} is installed in slot {trial.slot} and has not been booted yet "
                f"({failed.describe()}); left alone: reboot to try it"
            )
            return BootCheckOutcome(Outcome.PENDING, booted, reason)
        if not trial.installed:
            if failed.state is not SlotBootState.BAD:
                bl.mark_bad(trial.slot)
            state = replace(state.with_slot(trial.slot, SlotRecord()), trial=None)
            reason = (
                f"install of version {trial.bundle_version} into slot {trial.slot} was interrupted "
                f"(power cut or crash); slot {trial.slot} stays unbootable, {booted} runs on"
            )
            device.record(
                trial_event(trial, EventType.INSTALL, Result.FAILED, reason),
                state,
            )
            return BootCheckOutcome(Outcome.NOTHING, booted, reason)
        if trial.failure:
            reason = f"slot {trial.slot} failed its health checks: {trial.failure}"
        elif device.watchdog.last_reset_was_watchdog():
            reason = (
                f"slot {trial.slot} hung and was reset by the watchdog; "
                f"it did not commit within {device.config.tries} boot attempts"
            )
        elif failed.state is SlotBootState.TRIAL and failed.tries_left == 0:
            reason = f"slot {trial.slot} did not commit within {device.config.tries} boot attempts"
        elif failed.state is SlotBootState.BAD:
            # No verdict of ours made it bad (that is saved first): an operator, or a
            # bootloader tool (systemd-bless-boot bad), or a loader that stores used-up
            # tries as bad. "Not booted" would be a guess.
            reason = (
                f"slot {trial.slot} did not commit: the bootloader has it marked bad "
                f"(its {device.config.tries} boot attempts ran out, or it was marked bad by hand)"
            )
        else:
            reason = f"slot {trial.slot} was not booted (bootloader state: {failed.describe()})"
        reason = f"{reason}; running {booted} again"
        event = trial_event(trial, EventType.ROLLBACK, Result.ROLLED_BACK, reason)
        # Recorded before the slot is marked bad: the reason above is read from the
        # bootloader state and the watchdog, which marking bad (or the next boot) changes.
        device.record(event, replace(state, trial=None))
        crashpoint("after-rollback-recorded")
        if failed.state is not SlotBootState.BAD:
            bl.mark_bad(trial.slot)
        return BootCheckOutcome(Outcome.ROLLED_BACK, booted, reason)

    if slot_boot.state is SlotBootState.GOOD and bl.refresh():
        return BootCheckOutcome(Outcome.NOTHING, booted, f"slot {booted} is good; boot counters restored")
    if slot_boot.state is SlotBootState.GOOD:
        return BootCheckOutcome(Outcome.NOTHING, booted, f"slot {booted} is good; nothing to do")
    reason = (
        f"booted slot {booted} is {slot_boot.describe()}, not committed: not reaching boot-complete; "
        "reboot into a good slot, or ota-agent mark-good if you know this one is good"
    )
    return BootCheckOutcome(Outcome.NOT_GOOD, booted, reason)


def commit(device: Device, booted: str, why: str) -> BootCheckOutcome:
    """Commit the booted slot: mark it good in the bootloader, then `_commit`. The
    operator's mark-good of the booted slot comes here; boot-check's own success runs
    the same two steps with its crash point and the watchdog's disarm between them."""
    device.bootloader.mark_good(booted)
    return _commit(device, booted, why)


def _verdict(trial: Trial) -> str | None:
    """Why a trial must not be committed, if that was already decided."""
    if trial.cancelled:
        return f"update {trial.bundle_version} was cancelled: {trial.cancelled}"
    if trial.failure:
        return f"slot {trial.slot} failed its health checks: {trial.failure}"
    return None


def _commit(device: Device, booted: str, why: str) -> BootCheckOutcome:
    """Record the commit of the booted slot (already marked good in the bootloader)."""
    state = device.store.load()
    trial = state.trial if state.trial is not None and state.trial.slot == booted else None
    floor = state.committed_security_version
    if trial is not None:
        floor = max(floor, trial.security_version)
        if not trial.installed:
            # Power cut between "try this slot" and recording it: the trial record has what we need.
            record = SlotRecord(trial.bundle_version, trial.sha256, trial.security_version, None, trial.images)
            state = state.with_slot(booted, record)
    reason = f"{why}; committed (security version now {floor})"
    version = trial.bundle_version if trial else None
    txn = trial.txn if trial else None
    installed = state.last_result
    # The install's /etc conflicts stay in `status` after the commit (the update they belong to is now running).
    carried = installed.conflicts if installed is not None and txn is not None and installed.txn == txn else ()
    event = Event(
        event=EventType.COMMIT,
        result=Result.OK,
        reason=reason,
        txn=txn,
        bundle_version=version,
        slot=booted,
        conflicts=carried,
    )
    device.record(event, replace(state, committed_security_version=floor, trial=None))
    crashpoint("after-commit-recorded")
    return BootCheckOutcome(Outcome.COMMITTED, booted, reason)


def _health(device: Device, override: HealthOverride | None) -> HealthResult:
    if override is HealthOverride.OK:
        return HealthResult(True, "health checks forced to pass")
    if override is HealthOverride.FAIL:
        return HealthResult(False, "health checks forced to fail")
    return device.health(device.config.health)
