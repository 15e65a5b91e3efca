"""The second phase of the two-phase truth, as a pure decision: an installed job
succeeds only on a commit with its txn, rolls back with boot-check's reason,
waits while its trial is pending, and is never called a success when nothing
says so; jobs that had started before a restart are settled from the trial
record and the recorded events."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.events import Event, EventType, Result
from agent.mqtt.journal import JobRecord
from agent.mqtt.schema import Job, JobStatus, JobType
from agent.mqtt.settle import UNRECORDED, Next, after_restart, verdict
from agent.state import Trial

JOB = "rollout-7"


def ev(event: EventType, result: Result, reason: str = "why", txn: str | None = JOB) -> Event:
    return Event(event=event, result=result, reason=reason, txn=txn)


def trial(*, txn: str = JOB, installed: bool = True, failure: str | None = None) -> Trial:
    return Trial(slot="B", txn=txn, bundle_version="2.0", security_version=2, installed=installed, failure=failure)


def record(kind: JobType = JobType.INSTALL, status: JobStatus = JobStatus.IN_PROGRESS) -> JobRecord:
    return JobRecord(Job(id=JOB, type=kind, created=datetime(2026, 5, 1, tzinfo=UTC), url="http://x/b.otab"), status)


def test_a_commit_with_the_jobs_txn_is_success_with_boot_checks_reason() -> None:
    found = verdict(JOB, None, [ev(EventType.INSTALL, Result.OK), ev(EventType.COMMIT, Result.OK, "2 checks passed")])
    assert found is not None
    assert (found.status, found.reason) == (JobStatus.SUCCEEDED, "2 checks passed")


@pytest.mark.parametrize("reason", ["slot B failed its health checks: x", "slot B hung and was reset by the watchdog"])
def test_a_rollback_after_a_failed_commit_is_rolled_back_with_the_rollbacks_reason(reason: str) -> None:
    events = [ev(EventType.COMMIT, Result.FAILED, "rebooting"), ev(EventType.ROLLBACK, Result.ROLLED_BACK, reason)]
    found = verdict(JOB, None, events)
    assert found is not None
    assert (found.status, found.reason) == (JobStatus.ROLLED_BACK, reason)


def test_no_verdict_while_the_trial_of_the_job_is_pending_or_being_assessed() -> None:
    assert verdict(JOB, trial(), [ev(EventType.INSTALL, Result.OK)]) is None
    assert verdict(JOB, trial(failure="check failed"), [ev(EventType.COMMIT, Result.FAILED)]) is None


def test_events_of_other_transactions_decide_nothing() -> None:
    found = verdict(JOB, trial(txn="other"), [ev(EventType.COMMIT, Result.OK, txn="other")])
    assert found is not None
    assert (found.status, found.reason) == (JobStatus.FAILED, UNRECORDED)


def test_a_replaced_pending_update_fails_with_the_replacing_installs_reason() -> None:
    found = verdict(JOB, trial(txn="newer"), [ev(EventType.INSTALL, Result.CANCELLED, "replaced by 3.0")])
    assert found is not None
    assert (found.status, found.reason) == (JobStatus.FAILED, "replaced by 3.0")


def test_after_a_restart_an_installed_job_waits_for_the_boots_verdict() -> None:
    step = after_restart(record(status=JobStatus.INSTALLED), trial(), [], booted="B", pending=False,
                         reboot_after_install=True)
    assert (step.status, step.next) == (None, Next.WAIT)


def test_after_a_restart_a_written_but_unreported_install_is_installed_and_rebooted_into() -> None:
    step = after_restart(record(), trial(), [], booted="A", pending=True, reboot_after_install=True)
    assert (step.status, step.next) == (JobStatus.INSTALLED, Next.REBOOT)
    assert step.installed is not None
    assert step.installed.slot == "B"
    no_reboot = after_restart(record(), trial(), [], booted="A", pending=True, reboot_after_install=False)
    assert (no_reboot.status, no_reboot.next) == (JobStatus.INSTALLED, Next.WAIT)


def test_after_a_restart_an_install_that_never_finished_writing_failed() -> None:
    step = after_restart(record(), trial(installed=False), [], booted="A", pending=False, reboot_after_install=True)
    assert (step.status, step.next) == (JobStatus.FAILED, Next.DONE)
    assert "interrupted" in step.reason
    assert "slot B stays unbootable" in step.reason
    refused = after_restart(record(), None, [ev(EventType.INSTALL, Result.FAILED, "bad signature")], booted="A",
                            pending=False, reboot_after_install=True)
    assert (refused.status, refused.reason) == (JobStatus.FAILED, "bad signature")


def test_after_a_restart_an_install_decided_meanwhile_takes_the_verdict() -> None:
    step = after_restart(record(), None, [ev(EventType.COMMIT, Result.OK, "committed")], booted="B", pending=False,
                         reboot_after_install=True)
    assert (step.status, step.reason, step.next) == (JobStatus.SUCCEEDED, "committed", Next.DONE)


def test_after_a_restart_a_reboot_job_succeeded_and_a_mark_job_is_reported_interrupted() -> None:
    reboot = after_restart(record(JobType.REBOOT), None, [], booted="B", pending=False, reboot_after_install=True)
    assert (reboot.status, reboot.next) == (JobStatus.SUCCEEDED, Next.DONE)
    mark = after_restart(record(JobType.MARK_GOOD), None, [], booted="B", pending=False, reboot_after_install=True)
    assert (mark.status, mark.next) == (JobStatus.FAILED, Next.DONE)


def test_after_a_restart_a_rollback_job_succeeds_only_when_its_slot_committed() -> None:
    waiting = after_restart(record(JobType.ROLLBACK), trial(), [], booted="B", pending=False,
                            reboot_after_install=True)
    assert waiting.next is Next.WAIT
    done = after_restart(record(JobType.ROLLBACK), None, [ev(EventType.COMMIT, Result.OK, "ok")], booted="B",
                         pending=False, reboot_after_install=True)
    assert (done.status, done.next) == (JobStatus.SUCCEEDED, Next.DONE)
    back = after_restart(record(JobType.ROLLBACK), None, [ev(EventType.ROLLBACK, Result.ROLLED_BACK, "fell back")],
                         booted="A", pending=False, reboot_after_install=True)
    assert (back.status, back.reason) == (JobStatus.FAILED, "fell back")
