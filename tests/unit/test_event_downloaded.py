"""An install's event carries `downloaded`, the bytes that crossed the network:
it survives the outbox and state files, is refused when a stored file holds
something else, fits the outbox record bound, and reaches the MQTT event report."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from agent.events import MAX_DOWNLOADED, Event, EventType, Result
from agent.mqtt.reports import event_report
from agent.outbox import MAX_RECORD_BYTES, Record, encode

WHEN = "2026-12-01T12:00:00Z"


def test_downloaded_round_trips_through_json() -> None:
    event = Event(event=EventType.INSTALL, result=Result.FAILED, reason="gave up", downloaded=123456, time=WHEN)
    assert Event.from_json(json.loads(json.dumps(asdict(event)))) == event


@pytest.mark.parametrize("value", ["12", -1, 1.5, True, MAX_DOWNLOADED + 1])
def test_a_stored_downloaded_that_is_not_a_byte_count_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="downloaded"):
        Event.from_json({"event": "install", "result": "ok", "downloaded": value})


def test_a_widest_event_with_the_largest_count_fits_the_record_bound() -> None:
    event = Event(event="x" * 64, result="y" * 64, reason="z" * 300, downloaded=MAX_DOWNLOADED, time=WHEN)
    assert len(encode(Record(1, "f" * 32, event, 0))) <= MAX_RECORD_BYTES


def test_the_mqtt_event_report_carries_downloaded() -> None:
    event = Event(event=EventType.INSTALL, result=Result.OK, downloaded=42, time=WHEN)
    assert event_report("gw-1", Record(3, "a" * 32, event, 0))["downloaded"] == 42
