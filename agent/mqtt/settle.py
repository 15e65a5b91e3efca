"""Settling jobs whose outcome a boot decides: the second phase of the
two-phase truth, as a pure function of what the device recorded.

An install job is "installed" once its image is written and read back; what
happens next is decided by the bootloader and boot-check, possibly after a
real reboot that restarted the agent, possibly by another process (the
boot-check service). Their verdicts are events whose `txn` is the job id
(the installer uses the job id as its txn, and the trial keeps it):

    commit / ok               the new slot booted, passed its checks, committed  -> succeeded
    rollback / rolled-back    the device went back (health checks, watchdog,
                              bootloader fallback; the reason says which)        -> rolled-back
    install / cancelled       a later install replaced it before it was tried   -> failed
    install / failed          the install was interrupted (power cut, crash)    -> failed

`verdict` looks for the newest of these among the events it is given (the
unacknowledged outbox records and the state's last result); while the trial
of the job is still recorded (not booted yet, or being assessed) there is no
verdict yet. A job with neither a verdict nor a trial failed: nothing on the
device says what became of it, and it is never reported as succeeded.

`after_restart` decides what a job that had started before the agent
restarted is now, from the same facts and the trial record.

Owns the decision only; the front end reads the facts and records the result.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from agent.events import Event, EventType, Result
from agent.mqtt.journal import JobRecord
from agent.mqtt.schema import JobStatus, JobType
from agent.state import Trial

_DECISIVE: dict[tuple[str, str], JobStatus] = {
    (EventType.COMMIT, Result.OK): JobStatus.SUCCEEDED,
    (EventType.ROLLBACK, Result.ROLLED_BACK): JobStatus.ROLLED_BACK,
    (EventType.INSTALL, Result.CANCELLED): JobStatus.FAILED,
    (EventType.INSTALL, Result.FAILED): JobStatus.FAILED,
}

UNRECORDED = ("no commit or rollback of this job was recorded and no update of it is pending "
              "(replaced by a later install, or cleared by hand); see the device's status")


@dataclass(frozen=True, slots=True)
class Verdict:
    status: JobStatus
    reason: str


def verdict(job_id: str, trial: Trial | None, events: Iterable[Event]) -> Verdict | None:
    """The boot's verdict on job `job_id`, or None while its trial is still pending.
    `events` oldest first; only those with `txn == job_id` count."""
    decisive = [e for e in events if e.txn == job_id and (e.event, e.result) in _DECISIVE]
    if decisive:
        last = decisive[-1]
        return Verdict(_DECISIVE[(last.event, last.result)], last.reason)
    if trial is not None and trial.txn == job_id:
        return None
    return Verdict(JobStatus.FAILED, UNRECORDED)


class Next(enum.Enum):
    """What the front end does with a job that had started before a restart."""

    WAIT = "wait"  # installed: wait for the boot's verdict
    REBOOT = "reboot"  # installed and not tried yet: reboot into it (as the job asked)
    DONE = "done"  # moved to a final status


@dataclass(frozen=True, slots=True)
class Step:
    """A job's status after a restart (None: unchanged), and what comes next. For an install
    that reached its slot `installed` says so, with the trial's version and slot."""

    status: JobStatus | None
    reason: str
    next: Next
    installed: Trial | None = None


def after_restart(record: JobRecord, trial: Trial | None, events: Iterable[Event], *, booted: str | None,
                  pending: bool, reboot_after_install: bool) -> Step:
    """`pending`: the trial of this job is installed and the next boot tries it (it has not booted yet)."""
    job_id = record.id
    events = list(events)
    mine = trial if trial is not None and trial.txn == job_id else None
    if record.status is JobStatus.INSTALLED:
        return Step(None, "", Next.WAIT)
    if record.type.installs:
        if mine is not None and mine.installed and mine.failure is None and mine.cancelled is None:
            if pending and reboot_after_install:
                return Step(JobStatus.INSTALLED, _written(mine), Next.REBOOT, mine)
            return Step(JobStatus.INSTALLED, _written(mine), Next.WAIT, mine)
        found = verdict(job_id, None, events)
        if found is not None and found.status is not JobStatus.FAILED:
            # It was written, booted and decided while the agent was away: installed, then the verdict.
            return Step(found.status, found.reason, Next.DONE)
        if found is not None and found.reason != UNRECORDED:
            return Step(JobStatus.FAILED, found.reason, Next.DONE)
        where = f"; slot {mine.slot} stays unbootable" if mine is not None else ""
        return Step(JobStatus.FAILED, f"interrupted: the agent stopped during the install{where}", Next.DONE)
    if record.type is JobType.REBOOT:
        return Step(JobStatus.SUCCEEDED, "the agent restarted after the reboot request"
                    + (f"; booted slot {booted}" if booted else ""), Next.DONE)
    if record.type is JobType.ROLLBACK:
        found = verdict(job_id, mine, events)
        if found is None:
            return Step(None, "", Next.WAIT)
        return rollback_result(found)
    return Step(JobStatus.FAILED, "interrupted: the agent stopped while the job ran; see the device's status",
                Next.DONE)


def rollback_result(found: Verdict) -> Step:
    """A rollback job ends when the slot it rolled back to committed (succeeded) or not (failed)."""
    if found.status is JobStatus.SUCCEEDED:
        return Step(JobStatus.SUCCEEDED, found.reason, Next.DONE)
    return Step(JobStatus.FAILED, found.reason, Next.DONE)


def _written(trial: Trial) -> str:
    return f"version {trial.bundle_version} written to slot {trial.slot} and read back"
