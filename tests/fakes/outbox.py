"""An in-memory outbox with the interface the MQTT reporter expects
(`pending()` in `seq` order, `ack(seq)`), plus the route that turns its
records into MQTT messages. Records the order of acks for the tests and can
call a hook on each ack (e.g. to freeze the broker mid-way)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.mqtt.reporter import Message


@dataclass(frozen=True, slots=True)
class FakeRecord:
    seq: int
    id: str
    topic: str
    payload: bytes
    retain: bool = False


@dataclass
class FakeOutbox:
    on_ack: Callable[[int], None] | None = None
    acked: list[int] = field(default_factory=list)
    dropped: int = 0
    _records: dict[int, FakeRecord] = field(default_factory=dict)
    _next: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def append(self, topic: str, payload: bytes | None = None, *, retain: bool = False) -> FakeRecord:
        """A new record; without a payload, it is the JSON `{"seq": ..., "id": ...}` of the record."""
        with self._lock:
            seq, record_id = self._next, uuid.uuid4().hex
            if payload is None:
                payload = json.dumps({"seq": seq, "id": record_id}).encode()
            record = FakeRecord(seq, record_id, topic, payload, retain)
            self._records[record.seq] = record
            self._next += 1
            return record

    def pending(self) -> list[FakeRecord]:
        with self._lock:
            return [self._records[seq] for seq in sorted(self._records)]

    def ack(self, seq: int) -> None:
        with self._lock:
            if self._records.pop(seq, None) is None:
                raise AssertionError(f"ack of unknown or already acknowledged seq {seq}")
            self.acked.append(seq)
        if self.on_ack is not None:
            self.on_ack(seq)


def route(record: FakeRecord) -> Message:
    return Message(record.topic, record.payload, record.retain)
