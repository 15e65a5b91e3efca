"""Outbox records as MQTT documents: a job step goes to the job's status topic
as a job report (with its outbox seq and id, its group, version and slot as
details), every other record to the events topic; progress and the retained
status read back through the operator's parser."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.events import Event, EventType, Result
from agent.jobs import JobState, JobView, Progress
from agent.mqtt.reports import job_event, progress_report, route, status_report, status_state
from agent.mqtt.schema import JobStatus, encode, parse_report
from agent.mqtt.topics import Topics
from agent.outbox import Record

TOPICS = Topics.for_device("gw-1")
WHEN = "2026-05-01T12:00:00Z"


def rec(event: Event, seq: int = 7, dropped: int = 0) -> Record:
    return Record(seq, "a" * 32, event, dropped)


def test_a_job_step_is_a_job_status_report_on_the_jobs_topic() -> None:
    event = job_event("rollout-1", JobStatus.INSTALLED, "written", bundle_version="2.0", slot="B")
    message = route(TOPICS, lambda job: "canary")(rec(_timed(event), dropped=2))
    assert message.topic == TOPICS.job_status("rollout-1")
    doc = parse_report(message.payload)
    assert (doc["job"], doc["status"], doc["seq"], doc["id"], doc["group"]) == ("rollout-1", "installed", 7,
                                                                                 "a" * 32, "canary")
    assert doc["details"] == {"bundle_version": "2.0", "slot": "B"}
    assert (doc["dropped"], doc["time"], doc["reason"]) == (2, WHEN, "written")


def _timed(event: Event) -> Event:
    return Event(event=event.event, result=event.result, reason=event.reason, txn=event.txn,
                 bundle_version=event.bundle_version, slot=event.slot, time=WHEN)


def test_any_other_record_is_an_event_report_with_its_seq_and_id() -> None:
    event = Event(event=EventType.COMMIT, result=Result.OK, reason="ok", txn="rollout-1", slot="B", time=WHEN)
    message = route(TOPICS, lambda job: None)(rec(event))
    assert message.topic == TOPICS.events
    doc = parse_report(message.payload)
    assert {k: doc[k] for k in ("event", "result", "txn", "slot", "seq", "id")} == {
        "event": "commit", "result": "ok", "txn": "rollout-1", "slot": "B", "seq": 7, "id": "a" * 32}


def test_a_job_record_that_names_no_job_status_is_still_published_on_the_events_topic() -> None:
    for event in (Event(event=EventType.JOB, result="exploded", txn="rollout-1", time=WHEN),
                  Event(event=EventType.JOB, result="succeeded", txn="not a name!", time=WHEN)):
        message = route(TOPICS, lambda job: None)(rec(event))
        assert message.topic == TOPICS.events
        parse_report(message.payload)


def test_progress_reads_as_an_in_progress_report_of_the_job() -> None:
    view = JobView("rollout-1", "install", "mqtt", JobState.RUNNING, Progress("writing", 5, 10, 3.0))
    doc = progress_report("gw-1", view, datetime(2026, 5, 1, tzinfo=UTC))
    assert doc is not None
    back = parse_report(encode(doc))
    assert (back["job"], back["status"], back["phase"], back["percent"]) == ("rollout-1", "in-progress", "writing",
                                                                             50.0)
    assert progress_report("gw-1", JobView("j", "install", "cli", JobState.RUNNING), datetime.now(UTC)) is None


def test_the_retained_status_carries_the_app_status_without_the_running_jobs_progress() -> None:
    app = {"booted": "A", "job": {"id": "j", "state": "in-progress", "progress": {"done": 1}}, "slots": {}}
    state = status_state(app)
    assert state["job"] == {"id": "j", "state": "in-progress"}
    assert app["job"]["progress"] == {"done": 1}  # not changed in place
    doc = parse_report(encode(status_report("gw-1", ("lab",), state, datetime(2026, 5, 1, tzinfo=UTC))))
    assert (doc["device"], doc["groups"], doc["state"]["booted"]) == ("gw-1", ["lab"], "A")
