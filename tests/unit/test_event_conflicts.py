"""An install event's /etc conflicts: structured records (path, kind, outcome,
detail), bounded by construction (at most MAX_CONFLICTS, each field cleaned to
its limit), round-tripping through the outbox and state.json, refused clearly
when a stored file holds something else, and absent from the JSON of every
event without conflicts (so those read exactly as before). The MQTT documents
carry them the same way."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from agent.events import CONFLICT_LIMITS, MAX_CONFLICTS, EtcConflict, Event, EventType, Result
from agent.mqtt.reports import event_report, job_event, job_status_report
from agent.mqtt.schema import MAX_REPORT_CONFLICTS, JobStatus, job_report, parse_report
from agent.outbox import MAX_RECORD_BYTES, Record, decode, encode
from agent.state import AgentState, parse
from agent.state import encode as encode_state

HOSTNAME = EtcConflict("hostname", "both-changed", "kept-local", "changed on the device and in the new image")


def install_event(*conflicts: EtcConflict) -> Event:
    return Event(event=EventType.INSTALL, result=Result.OK, reason="installed", txn="job-1", conflicts=conflicts)


def test_an_event_without_conflicts_has_no_conflicts_key() -> None:
    assert "conflicts" not in install_event().to_json()
    assert "conflicts" not in Record(1, "a1", install_event()).to_json()


def test_conflicts_round_trip_through_the_outbox_and_the_state() -> None:
    event = install_event(HOSTNAME)
    assert decode(encode(Record(7, "a1", event)).rstrip(b"\n")).event == event
    state = parse(encode_state(AgentState(last_result=event))).state
    assert state.last_result == event
    assert json.loads(encode_state(state))["last_result"]["conflicts"] == [HOSTNAME.to_json()]


def test_conflicts_are_bounded_by_construction() -> None:
    wide = EtcConflict(**{name: "\U0001f600\n" * 1000 for name in CONFLICT_LIMITS})
    event = install_event(*[wide] * (MAX_CONFLICTS + 7))
    assert len(event.conflicts) == MAX_CONFLICTS
    for name, limit in CONFLICT_LIMITS.items():
        value = getattr(event.conflicts[0], name)
        assert len(value) <= limit
        assert "\n" not in value
    assert len(encode(Record(1, "a" * 64, event))) <= MAX_RECORD_BYTES


@pytest.mark.parametrize(
    ("conflicts", "problem"),
    [
        ("hostname", "is not a list"),
        ([1], "holds something other than objects"),
        ([{"kind": "both-changed"}], "without a path"),
        ([{"path": "hostname", "kind": 3}], "non-string field"),
    ],
)
def test_a_stored_event_with_malformed_conflicts_is_refused_naming_the_field(conflicts: object, problem: str) -> None:
    doc = {"event": "install", "result": "ok", "conflicts": conflicts}
    with pytest.raises(ValueError, match=problem):
        Event.from_json(doc)


def test_the_mqtt_reports_carry_the_conflicts_and_nothing_when_there_are_none() -> None:
    record = Record(3, "b2", job_event("job-1", JobStatus.INSTALLED, "written", conflicts=(HOSTNAME,)))
    report = job_status_report("gw-1", record)
    assert report is not None
    assert report["conflicts"] == [HOSTNAME.to_json()]
    assert parse_report(json.dumps(report).encode())["conflicts"] == [HOSTNAME.to_json()]
    assert event_report("gw-1", Record(4, "c3", install_event(HOSTNAME)))["conflicts"] == [HOSTNAME.to_json()]
    plain = job_status_report("gw-1", Record(5, "d4", job_event("job-1", JobStatus.SUCCEEDED, "committed")))
    assert plain is not None
    assert "conflicts" not in plain
    assert "conflicts" not in event_report("gw-1", Record(6, "e5", install_event()))


def test_a_job_report_bounds_and_cleans_foreign_conflicts() -> None:
    foreign = [{"path": "a\nb" * 500, "kind": "x", "extra": "dropped"}] * (MAX_REPORT_CONFLICTS + 3)
    doc = job_report(report_id="r", device="gw-1", job_id="job-1", status=JobStatus.FAILED,
                     time=datetime(2026, 12, 1, tzinfo=UTC), conflicts=foreign)
    assert len(doc["conflicts"]) == MAX_REPORT_CONFLICTS
    first = doc["conflicts"][0]
    assert sorted(first) == ["detail", "kind", "outcome", "path"]
    assert "\n" not in first["path"]
    assert len(first["path"]) <= 256
