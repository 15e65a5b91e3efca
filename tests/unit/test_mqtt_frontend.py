"""How the MQTT front end names the end of a job that did not succeed: a refusal
before anything was written is "rejected" (the device refused the bundle or
request, nothing changed), a failure on the way "failed", a cancel "canceled"."""

from __future__ import annotations

import pytest

from agent.jobs import JobState, JobView, Progress
from agent.mqtt.frontend import MqttFrontEnd
from agent.mqtt.schema import JobStatus


def ended(state: JobState, error_type: str, progress: Progress | None = None) -> JobStatus:
    view = JobView("j1", "install", "mqtt", state, progress, error="why", error_type=error_type)
    return MqttFrontEnd._failure_status(view)


@pytest.mark.parametrize("kind", ["SignatureError", "IncompatibleError", "DowngradeError", "ExpiredError",
                                  "PlanError", "FormatError", "MarkError"])
def test_a_refusal_before_writing_is_rejected(kind: str) -> None:
    assert ended(JobState.FAILED, kind) is JobStatus.REJECTED


@pytest.mark.parametrize("kind", ["SourceError", "HashMismatchError", "LockBusyError", "HwError", "OtaError"])
def test_a_failure_on_the_way_is_failed(kind: str) -> None:
    assert ended(JobState.FAILED, kind) is JobStatus.FAILED


def test_a_refusal_after_bytes_were_written_is_failed_not_rejected() -> None:
    assert ended(JobState.FAILED, "FormatError", Progress("writing", 4096, 8192)) is JobStatus.FAILED


def test_a_canceled_job_is_canceled() -> None:
    assert ended(JobState.CANCELED, "CanceledError", Progress("writing", 1, 2)) is JobStatus.CANCELED
