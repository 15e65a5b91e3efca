"""The job queue: one job at a time, busy answers naming the running job,
progress to every subscriber, cancellation at a safe point, and a crashing job
that does not wedge the queue."""

from __future__ import annotations

import threading

import pytest

from agent.errors import BusyError
from agent.jobs import JobContext, JobQueue, JobState, JobView
from ota_common.errors import OtaError


def test_a_second_job_while_one_runs_is_busy_and_names_the_running_job() -> None:
    queue = JobQueue()
    release = threading.Event()
    first = queue.submit("install", lambda ctx: release.wait(10), origin="mqtt")
    with pytest.raises(BusyError) as busy:
        queue.submit("mark-good", lambda ctx: None, origin="cli")
    assert busy.value.job_id == first.id
    assert first.id in str(busy.value)
    release.set()
    done = queue.wait(first.id, timeout=10)
    assert done is not None
    assert done.state is JobState.SUCCEEDED
    assert queue.submit("mark-good", lambda ctx: "ok", origin="cli").command == "mark-good"


def test_every_subscriber_sees_the_lifecycle_and_progress_in_order() -> None:
    queue = JobQueue()
    seen: list[JobView] = []
    queue.subscribe(seen.append)

    def work(ctx: JobContext) -> str:
        for done in (0, 50, 100):
            ctx.progress("writing", done, 100)
        return "result"

    view = queue.run_inline("install", work, origin="api", job_id="job-1")
    assert view.state is JobState.SUCCEEDED
    assert view.result == "result"
    states = [v.state for v in seen]
    assert states[0] is JobState.QUEUED
    assert states[-1] is JobState.SUCCEEDED
    assert [v.progress.done for v in seen if v.progress and v.state is JobState.RUNNING] == [0, 50, 100]
    assert seen[-1].to_json()["id"] == "job-1"


def test_cancel_stops_the_job_at_its_next_progress_report() -> None:
    queue = JobQueue()
    started = threading.Event()
    steps: list[int] = []

    def work(ctx: JobContext) -> None:
        started.set()
        for i in range(1000):
            steps.append(i)
            ctx.progress("writing", i, 1000)
            threading.Event().wait(0.01)

    view = queue.submit("install", work, origin="cli")
    assert started.wait(10)
    queue.cancel(view.id)
    done = queue.wait(view.id, timeout=10)
    assert done is not None
    assert done.state is JobState.CANCELED
    assert len(steps) < 1000
    with pytest.raises(OtaError, match="no job is running"):
        queue.cancel()


def test_a_failing_or_crashing_job_is_reported_and_frees_the_queue() -> None:
    queue = JobQueue()

    def fails(ctx: JobContext) -> None:
        raise OtaError("bundle refused\nfake line")

    def crashes(ctx: JobContext) -> None:
        raise RuntimeError("bug")

    failed = queue.run_inline("install", fails, origin="cli")
    assert failed.state is JobState.FAILED
    assert failed.error == "bundle refused\\nfake line"
    crashed = queue.run_inline("install", crashes, origin="cli")
    assert crashed.state is JobState.FAILED
    assert crashed.error_type == "RuntimeError"
    assert queue.running() is None


def test_a_broken_listener_does_not_stop_the_job() -> None:
    queue = JobQueue()

    def broken(view: JobView) -> None:
        raise ValueError("listener bug")

    queue.subscribe(broken)
    assert queue.run_inline("reboot", lambda ctx: 1, origin="cli").state is JobState.SUCCEEDED
