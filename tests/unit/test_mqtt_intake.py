"""From an incoming MQTT message to an answered, journalled job: malformed,
oversized, replayed, expired, out-of-date and busy jobs are answered and not
run; a valid one is journalled before the sink sees it; a restart between the
journal write and the PUBACK absorbs the broker's redelivery."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.intake import AnswerKind, JobAnswer, JobIntake, Outcome
from agent.mqtt.journal import Journal
from agent.mqtt.schema import MAX_JOB_BYTES, Job, JobStatus, parse_report
from agent.mqtt.topics import Topics

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
TOPICS = Topics.for_device("gw-1")


class Sink:
    """The application's side, as small as it gets: records what it was given and
    answers what it was told to."""

    def __init__(self, answer: JobAnswer | None = None, journal: Journal | None = None) -> None:
        self.jobs: list[Job] = []
        self.answer = answer or JobAnswer.queued()
        self.journal = journal
        self.run_at_once = False

    def submit(self, job: Job) -> JobAnswer:
        self.jobs.append(job)
        if self.run_at_once and self.journal is not None:
            self.journal.set_status(job.id, JobStatus.IN_PROGRESS)
            self.journal.set_status(job.id, JobStatus.SUCCEEDED)
        return self.answer


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.sent.append((topic, parse_report(payload)))

    def last(self) -> tuple[str, dict[str, Any]]:
        return self.sent[-1]


def make(tmp_path: Path, sink: Sink | None = None, now: datetime = T0 + timedelta(hours=1),
         groups: tuple[str, ...] = ("canary",)) -> tuple[JobIntake, Sink, Wire, Journal]:
    journal = Journal(tmp_path / "journal", capacity=8, clock=lambda: now)
    sink = sink or Sink()
    sink.journal = journal
    wire = Wire()
    return JobIntake(TOPICS, journal, sink, wire, groups=groups, clock=lambda: now), sink, wire, journal


def job_bytes(job_id: str = "j1", **fields: Any) -> bytes:
    d: dict[str, Any] = {"schema": 1, "id": job_id, "type": "reboot", "created": "2026-05-01T12:00:00Z"}
    d.update(fields)
    return json.dumps(d).encode()


def test_a_valid_job_is_journalled_handed_on_and_answered_queued(tmp_path: Path) -> None:
    intake, sink, wire, _ = make(tmp_path)
    handled = intake.handle(TOPICS.job("j1"), job_bytes())
    assert handled.outcome is Outcome.SUBMITTED
    assert [j.id for j in sink.jobs] == ["j1"]
    record = Journal(tmp_path / "journal", capacity=8).get("j1")
    assert record is not None
    assert record.status is JobStatus.QUEUED
    topic, answer = wire.last()
    assert topic == TOPICS.job_status("j1")
    assert (answer["status"], answer["device"], answer["job"]) == ("queued", "gw-1", "j1")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * (MAX_JOB_BYTES + 1), "more than the 16384 allowed"),
        (b"{not json", "not valid JSON"),
        (job_bytes(type="format"), "'format' is not a job type"),
        (job_bytes(extra=True), "unknown key 'extra'"),
        (job_bytes(job_id="other"), "differs from the job id 'j1' in the topic"),
    ],
)
def test_malformed_oversized_or_schema_violating_jobs_are_rejected_with_the_reason_and_not_run(
    tmp_path: Path, payload: bytes, reason: str
) -> None:
    intake, sink, wire, journal = make(tmp_path)
    handled = intake.handle(TOPICS.job("j1"), payload)
    assert handled.outcome is Outcome.REFUSED
    assert sink.jobs == []
    assert journal.records() == []
    topic, answer = wire.last()
    assert topic == TOPICS.job_status("j1")
    assert answer["status"] == "rejected"
    assert reason in answer["reason"]


def test_a_replayed_job_is_answered_with_its_recorded_status_and_not_run_again(tmp_path: Path) -> None:
    intake, sink, wire, _ = make(tmp_path)
    sink.run_at_once = True
    intake.handle(TOPICS.job("j1"), job_bytes())
    assert wire.last()[1]["status"] == "succeeded"
    handled = intake.handle(TOPICS.job("j1"), job_bytes())
    assert handled.outcome is Outcome.DUPLICATE
    assert len(sink.jobs) == 1
    answer = wire.last()[1]
    assert (answer["status"], answer["duplicate"]) == ("succeeded", True)


def test_the_same_job_through_a_group_and_directly_runs_once(tmp_path: Path) -> None:
    intake, sink, wire, _ = make(tmp_path)
    assert intake.handle(TOPICS.group_job("canary", "j1"), job_bytes()).outcome is Outcome.SUBMITTED
    assert wire.last()[1]["group"] == "canary"
    assert wire.last()[0] == TOPICS.job_status("j1")
    assert intake.handle(TOPICS.job("j1"), job_bytes()).outcome is Outcome.DUPLICATE
    assert len(sink.jobs) == 1


def test_jobs_of_other_groups_and_other_topics_are_ignored(tmp_path: Path) -> None:
    intake, sink, wire, _ = make(tmp_path)
    assert intake.handle(TOPICS.group_job("other", "j1"), job_bytes()).outcome is Outcome.IGNORED
    assert intake.handle(TOPICS.status, b"{}").outcome is Outcome.IGNORED
    assert sink.jobs == []
    assert wire.sent == []


def test_an_expired_job_is_journalled_as_rejected_and_not_run(tmp_path: Path) -> None:
    intake, sink, wire, journal = make(tmp_path, now=T0 + timedelta(days=2))
    handled = intake.handle(TOPICS.job("j1"), job_bytes(expires="2026-05-02T12:00:00Z"))
    assert handled.outcome is Outcome.EXPIRED
    assert sink.jobs == []
    assert "expired at 2026-05-02T12:00:00Z (device time 2026-05-03T12:00:00Z)" in wire.last()[1]["reason"]
    record = journal.get("j1")
    assert record is not None
    assert record.status is JobStatus.REJECTED
    assert intake.handle(TOPICS.job("j1"), job_bytes(expires="2026-05-02T12:00:00Z")).outcome is Outcome.DUPLICATE


def test_a_job_older_than_everything_the_journal_remembers_is_out_of_date(tmp_path: Path) -> None:
    intake, sink, wire, journal = make(tmp_path)
    for n in range(12):  # capacity 8: the first four are forgotten
        created = f"2026-05-01T12:{n:02d}:00Z"
        intake.handle(TOPICS.job(f"j{n}"), job_bytes(f"j{n}", created=created))
    assert journal.get("j0") is None
    handled = intake.handle(TOPICS.job("j0"), job_bytes("j0", created="2026-05-01T12:00:00Z"))
    assert handled.outcome is Outcome.OUT_OF_DATE
    assert "out of date" in wire.last()[1]["reason"]
    assert len(sink.jobs) == 12


def test_a_job_while_busy_is_rejected_with_the_running_job_id(tmp_path: Path) -> None:
    intake, sink, wire, journal = make(tmp_path, Sink(JobAnswer.busy("install-7")))
    intake.handle(TOPICS.job("j1"), job_bytes())
    answer = wire.last()[1]
    assert (answer["status"], answer["running"]) == ("rejected", "install-7")
    assert answer["reason"] == "busy: job install-7 is running"
    record = journal.get("j1")
    assert record is not None
    assert record.status is JobStatus.REJECTED
    intake.handle(TOPICS.job("j1"), job_bytes())
    assert wire.last()[1]["reason"] == "busy: job install-7 is running"
    assert len(sink.jobs) == 1


def test_a_sink_that_refuses_or_fails_makes_the_job_rejected(tmp_path: Path) -> None:
    intake, _, wire, journal = make(tmp_path, Sink(JobAnswer.rejected("bundle is for compatible 'x'")))
    intake.handle(TOPICS.job("j1"), job_bytes())
    assert wire.last()[1]["reason"] == "bundle is for compatible 'x'"
    record = journal.get("j1")
    assert record is not None
    assert (record.status, record.reason) == (JobStatus.REJECTED, "bundle is for compatible 'x'")

    class Broken(Sink):
        def submit(self, job: Job) -> JobAnswer:
            raise RuntimeError("boom\nsecond line")

    intake, _, wire, _ = make(tmp_path / "b", Broken())
    intake.handle(TOPICS.job("j1"), job_bytes())
    assert wire.last()[1]["reason"] == "internal error: boom\\nsecond line"


def test_a_job_topic_with_an_unusable_id_is_refused_on_the_events_topic(tmp_path: Path) -> None:
    intake, sink, wire, _ = make(tmp_path)
    handled = intake.handle(TOPICS.base + "/jobs/" + "x" * 100, job_bytes())
    assert handled.outcome is Outcome.REFUSED
    topic, event = wire.last()
    assert topic == TOPICS.events
    assert (event["event"], event["result"]) == ("job-refused", "rejected")
    assert sink.jobs == []


def test_a_job_the_journal_cannot_record_is_rejected_and_never_run(tmp_path: Path) -> None:
    intake, sink, wire, _ = make(tmp_path)
    (tmp_path / "journal").mkdir()
    intake.handle(TOPICS.job("j1"), job_bytes())
    assert sink.jobs == []
    assert "cannot journal the job" in wire.last()[1]["reason"]


def test_a_restart_between_journal_and_puback_absorbs_the_redelivery(tmp_path: Path) -> None:
    intake, sink, _, _ = make(tmp_path)
    sink.run_at_once = True
    intake.handle(TOPICS.job("j1"), job_bytes())  # ... and the device dies before the PUBACK
    intake2, sink2, wire2, _ = make(tmp_path)  # restart: the broker delivers the job again
    assert intake2.resume() == []
    assert intake2.handle(TOPICS.job("j1"), job_bytes()).outcome is Outcome.DUPLICATE
    assert sink2.jobs == []
    assert wire2.last()[1]["status"] == "succeeded"


def test_resume_hands_queued_jobs_on_again_and_returns_started_ones(tmp_path: Path) -> None:
    intake, _, _, journal = make(tmp_path)
    intake.handle(TOPICS.job("j1"), job_bytes("j1"))
    intake.handle(TOPICS.job("j2"), job_bytes("j2"))
    journal.set_status("j2", JobStatus.IN_PROGRESS)
    intake2, sink2, wire2, _ = make(tmp_path, Sink(JobAnswer(AnswerKind.QUEUED)))
    started = intake2.resume()
    assert [j.id for j in sink2.jobs] == ["j1"]
    assert [(r.id, r.status) for r in started] == [("j2", JobStatus.IN_PROGRESS)]
    assert wire2.sent == []


def test_resume_answers_jobs_the_sink_now_refuses(tmp_path: Path) -> None:
    intake, _, _, _ = make(tmp_path)
    intake.handle(TOPICS.job("j1"), job_bytes("j1"))
    intake2, _, wire2, journal2 = make(tmp_path, Sink(JobAnswer.busy("boot-check")))
    intake2.resume()
    record = journal2.get("j1")
    assert record is not None
    assert record.status is JobStatus.REJECTED
    assert wire2.last()[1]["running"] == "boot-check"
