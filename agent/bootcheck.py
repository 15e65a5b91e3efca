"""What the device runs after every boot (`ota-agent boot-check`).

* Booted slot on trial: run the health checks within the deadline, then commit
  (mark good, raise the committed security version) or mark the slot bad and
  ask for a reboot into the other slot.
* A trial was pending but the other slot booted: the bootloader fell back
  (tries exhausted, or we marked it bad): record the rollback and its reason.
* Otherwise nothing.

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
from agent.events import Event
from agent.health import HealthResult, run_checks
from agent.state import SlotRecord, Trial
from hw.bootloader.model import SlotBootState
from hw.watchdog import Watchdog

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    NOTHING = "nothing"
    COMMITTED = "committed"
    FAILED_REBOOT = "failed-reboot"
    ROLLED_BACK = "rolled-back"
    HUNG = "hung"  # only with HealthOverride.HANG: the simulated system stopped here


class HealthOverride(enum.Enum):
    """Test seam for the simulated device: force the health checks' result."""

    OK = "ok"
    FAIL = "fail"
    HANG = "hang"


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

    @property
    def reboot(self) -> bool:
        return self.outcome is Outcome.FAILED_REBOOT


def boot_check(device: Device, *, health: HealthOverride | None = None) -> BootCheckOutcome:
    try:
        with device.store.lock():
            return _boot_check(device, health)
    except LockBusyError:
        booted = device.bootloader.booted_slot()
        return BootCheckOutcome(Outcome.NOTHING, booted, "an install is in progress; nothing to assess")


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
        device.record(Event("commit", "failed", reason, txn, version, booted), state)
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
            event = Event("install", "cancelled", reason, trial.txn, trial.bundle_version, trial.slot)
            device.record(event, replace(state, trial=None))
            return BootCheckOutcome(Outcome.NOTHING, booted, reason)
        if not trial.installed:
            if failed.state is not SlotBootState.BAD:
                bl.mark_bad(trial.slot)
            state = replace(state.with_slot(trial.slot, SlotRecord()), trial=None)
            reason = (
                f"install of version {trial.bundle_version} into slot {trial.slot} was interrupted "
                f"(power cut or crash); slot {trial.slot} stays unbootable, {booted} runs on"
            )
            device.record(Event("install", "failed", reason, trial.txn, trial.bundle_version, trial.slot), state)
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
        event = Event("rollback", "rolled-back", reason, trial.txn, trial.bundle_version, trial.slot)
        # Recorded before the slot is marked bad: the reason above is read from the
        # bootloader state and the watchdog, which marking bad (or the next boot) changes.
        device.record(event, replace(state, trial=None))
        crashpoint("after-rollback-recorded")
        if failed.state is not SlotBootState.BAD:
            bl.mark_bad(trial.slot)
        return BootCheckOutcome(Outcome.ROLLED_BACK, booted, reason)

    if slot_boot.state is SlotBootState.GOOD and bl.refresh():
        return BootCheckOutcome(Outcome.NOTHING, booted, f"slot {booted} is good; boot counters restored")
    return BootCheckOutcome(Outcome.NOTHING, booted, f"slot {booted} is {slot_boot.describe()}; nothing to do")


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
            record = SlotRecord(trial.bundle_version, trial.sha256, trial.security_version, None)
            state = state.with_slot(booted, record)
    reason = f"{why}; committed (security version now {floor})"
    version = trial.bundle_version if trial else None
    event = Event("commit", "ok", reason, trial.txn if trial else None, version, booted)
    device.record(event, replace(state, committed_security_version=floor, trial=None))
    return BootCheckOutcome(Outcome.COMMITTED, booted, reason)


def _health(device: Device, override: HealthOverride | None) -> HealthResult:
    if override is HealthOverride.OK:
        return HealthResult(True, "health checks forced to pass")
    if override is HealthOverride.FAIL:
        return HealthResult(False, "health checks forced to fail")
    return run_checks(device.config.health)

