"""The operator's verdict on a slot (`ota-agent mark-good` / `mark-bad`).

Owns what marking a slot means beyond the bootloader bit, under the state lock
(a mark while an install or boot-check runs is refused as busy, changing nothing):

* mark-good of the booted slot while it is not committed yet (on trial, or a trial
  record names it) is a commit: `bootcheck.commit`, the one commit path (security
  floor raised, slot recorded, reported, trial cleared).
* mark-good of another slot makes it committed and the fallback target, so it is
  refused unless its content is known complete and verified: a slot record with
  a hash, and no unfinished install into it. `force=True` overrides (and drops the
  unfinished install's trial, which would otherwise mark the slot bad again).
* mark-bad makes the slot unbootable; a pending update in it is cancelled, or,
  when it is the booted trial slot, recorded as failed so the fallback boot
  reports the rollback with the operator's reason.

Does not own the bootloader's counting rules (hw.bootloader.model) or the commit
itself (agent.bootcheck).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from agent.bootcheck import commit
from agent.daemon import Device
from agent.errors import LockBusyError, MarkError
from agent.events import Event, EventType, Result
from agent.state import AgentState
from hw.bootloader.model import SlotBootState


class Verdict(enum.Enum):
    GOOD = "good"
    BAD = "bad"


@dataclass(frozen=True, slots=True)
class MarkOutcome:
    slot: str
    verdict: Verdict
    reason: str
    committed: bool  # mark-good committed the booted slot
    security_version: int  # the committed security version afterwards


def resolve(device: Device, which: str) -> str:
    """`booted`, `other` or a configured bootname -> a bootname."""
    names = device.config.bootnames
    if which in ("booted", "other"):
        booted = device.bootloader.booted_slot()
        return booted if which == "booted" else next(b for b in names if b != booted)
    if which not in names:
        raise MarkError(f"unknown slot {which!r}: use booted, other or one of {', '.join(names)}")
    return which


def mark(device: Device, which: str, verdict: Verdict, *, force: bool = False) -> MarkOutcome:
    slot = resolve(device, which)
    try:
        with device.store.lock():
            if verdict is Verdict.GOOD:
                return _mark_good(device, slot, force=force)
            return _mark_bad(device, slot, force=force)
    except LockBusyError:
        lock = device.store.dir / "lock"
        raise LockBusyError(
            f"busy: slot {slot} not marked {verdict.value}: another ota-agent command (an install or boot-check) "
            f"holds the state lock {lock}; try again when it has finished"
        ) from None


def unknown_content(state: AgentState, slot: str) -> str | None:
    """Why the slot's content is not known complete and verified, or None when it is."""
    trial = state.trial
    if trial is not None and trial.slot == slot and not trial.installed:
        return f"an install of version {trial.bundle_version} into it did not finish (failed or interrupted)"
    record = state.slots.get(slot)
    if record is None or record.sha256 is None:
        return "its last install failed or was interrupted, so its content is unknown"
    return None


def _mark_good(device: Device, slot: str, *, force: bool) -> MarkOutcome:
    bl = device.bootloader
    booted = bl.booted_slot()
    state = device.store.load()
    trial = state.trial
    if slot == booted:
        if bl.state().slots[slot].state is not SlotBootState.GOOD or (trial is not None and trial.slot == slot):
            outcome = commit(device, slot, f"slot {slot} marked good by operator")
            floor = device.store.load().committed_security_version
            return MarkOutcome(slot, Verdict.GOOD, outcome.reason, True, floor)
        reason = f"slot {slot} marked good by operator (it was already committed)"
    else:
        why = unknown_content(state, slot)
        if why is not None and not force:
            raise MarkError(
                f"refusing to mark slot {slot} good: {why}; it may hold a half-written image and would become "
                f"the fallback. Install a bundle into it, or pass --force if you know it holds a complete image"
            )
        reason = f"slot {slot} marked good by operator"
        if why is not None:
            reason = f"{reason} with --force although {why}"
            if trial is not None and trial.slot == slot and not trial.installed:
                state = replace(state, trial=None)  # else the next boot-check would mark it bad again
    bl.mark_good(slot)
    device.record(Event(event=EventType.MARK_GOOD, result=Result.OK, reason=reason, slot=slot), state)
    return MarkOutcome(slot, Verdict.GOOD, reason, False, state.committed_security_version)


def _mark_bad(device: Device, slot: str, *, force: bool = False) -> MarkOutcome:
    bl = device.bootloader
    booted = bl.booted_slot()
    boot = bl.state()
    fallback = [b for b in boot.order if b != slot and boot.slots[b].bootable]
    if slot == booted and not fallback and not force:
        raise MarkError(
            f"refusing to mark the booted slot {slot} bad: no other slot can boot, so the bootloader would "
            "fall back to a bad or unknown slot; pass --force if that is what you want"
        )
    state = device.store.load()
    trial = state.trial
    reason = f"slot {slot} marked bad by operator"
    txn = version = None
    if trial is not None and trial.slot == slot:
        txn, version = trial.txn, trial.bundle_version
        if slot == booted:
            # Reported as this trial's rollback once the other slot runs.
            state = replace(state, trial=replace(trial, failure="marked bad by operator"))
            reason = f"{reason}; version {version} will be rolled back at the next boot"
        else:
            state = replace(state, trial=None)
            reason = f"{reason}; the pending update to version {version} is cancelled"
    bl.mark_bad(slot)
    device.record(
        Event(event=EventType.MARK_BAD, result=Result.OK, reason=reason, txn=txn, bundle_version=version, slot=slot),
        state,
    )
    return MarkOutcome(slot, Verdict.BAD, reason, False, state.committed_security_version)
