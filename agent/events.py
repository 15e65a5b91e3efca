"""Structured events: the one record that feeds the log, `state.json`'s last
result and the status outbox (`agent.outbox`, which also holds `EventLog`).

Fixed field names (`event`, `txn`, `bundle_version`, `slot`, `result`,
`reason`, `time`, and for installs `downloaded`: bytes that crossed the network,
and `conflicts`: the /etc merge's conflicts, `EtcConflict` records, at most
`MAX_CONFLICTS`; omitted from the JSON form when empty, see `Event.to_json`).
An `Event` is bounded by construction: every field is run
through `ota_common.text.clean` when the record is built (whoever builds
it, from code or from a file), so no event can carry more than `MAX_EVENT_CHARS`
characters, a line break, a control character, or a fake log line.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from ota_common.text import clean

Clock = Callable[[], datetime]

REASON_LIMIT = 300
NAME_LIMIT = 128  # versions, slots, txn ids, digests
KIND_LIMIT = 64  # event and result names, times
LIMITS = {
    "event": KIND_LIMIT,
    "result": KIND_LIMIT,
    "reason": REASON_LIMIT,
    "txn": NAME_LIMIT,
    "bundle_version": NAME_LIMIT,
    "slot": NAME_LIMIT,
    "time": KIND_LIMIT,
}
MAX_DOWNLOADED = (1 << 63) - 1  # the largest `downloaded` an event carries (19 digits)
MAX_CONFLICTS = 10  # conflicts an event lists (its reason says how many there were)
CONFLICT_LIMITS = {"path": 256, "kind": KIND_LIMIT, "outcome": KIND_LIMIT, "detail": 160}
MAX_EVENT_CHARS = sum(LIMITS.values()) + len(str(MAX_DOWNLOADED)) + MAX_CONFLICTS * sum(CONFLICT_LIMITS.values())


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clean_or_none(value: object, limit: int) -> str | None:
    return None if value is None else clean(value, limit)


class EventType(enum.StrEnum):
    """What happened: the `event` field of the wire schema."""

    INSTALL = "install"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    MARK_GOOD = "mark-good"
    MARK_BAD = "mark-bad"
    REBOOT = "reboot"
    STATE = "state"  # the state file was set aside or the floor lost
    OUTBOX = "outbox"  # the outbox was repaired
    PROGRESS = "progress"
    PROVISION = "provision"  # factory provisioning (agent.provision)
    MEDIA = "media"  # a USB stick visit's receipt (agent.media.report)
    CONSOLE_AUTH = "console-auth"  # a failed technician challenge or a lockout (agent.console.auth)
    JOB = "job"  # a step of an MQTT job's lifecycle: `result` is its `agent.mqtt.schema.JobStatus` value


class Result(enum.StrEnum):
    """How it ended: the `result` field of the wire schema."""

    STARTED = "started"
    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALREADY_INSTALLED = "already-installed"
    REQUESTED = "requested"
    ROLLED_BACK = "rolled-back"
    REPAIRED = "repaired"
    SET_ASIDE = "set-aside"
    FLOOR_LOST = "floor-lost"


@dataclass(frozen=True, slots=True)
class EtcConflict:
    """One conflict of the /etc merge (agent.etcmerge), as reports carry it: the path
    under /etc, its kind (`both-changed`, `type-changed`, `deleted-locally`,
    `deleted-in-new`, `under-local-change`), what `[etc] on_conflict` made of it
    (`failed`: the install failed before the switch; `kept-local`; `took-new`)
    and a one-line description."""

    path: str
    kind: str
    outcome: str
    detail: str = ""

    def __post_init__(self) -> None:
        for name, limit in CONFLICT_LIMITS.items():
            object.__setattr__(self, name, clean(getattr(self, name), limit))

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "outcome": self.outcome, "detail": self.detail}

    @classmethod
    def from_json(cls, doc: object) -> EtcConflict:
        if not isinstance(doc, Mapping):
            raise ValueError("event field 'conflicts' holds something other than objects")
        values = {name: doc.get(name, "") for name in CONFLICT_LIMITS}
        if not all(isinstance(v, str) for v in values.values()) or not values["path"]:
            raise ValueError("event field 'conflicts' holds a conflict without a path or with a non-string field")
        return cls(**values)


def _conflicts(value: object) -> tuple[EtcConflict, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("event field 'conflicts' is not a list")
    return tuple(c if isinstance(c, EtcConflict) else EtcConflict.from_json(c) for c in value[:MAX_CONFLICTS])


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Built with keywords only (`Event(event=EventType.INSTALL, result=Result.OK, ...)`);
    `event` and `result` take the enums' values (a stored file may carry values a
    newer agent wrote: they are kept as text)."""

    event: str
    result: str
    reason: str = ""
    txn: str | None = None
    bundle_version: str | None = None
    slot: str | None = None
    time: str = ""
    downloaded: int | None = None  # an install's bytes that crossed the network (all attempts)
    conflicts: tuple[EtcConflict, ...] = ()  # an install's /etc merge conflicts (the first MAX_CONFLICTS)

    def __post_init__(self) -> None:
        for name in ("event", "result", "reason", "time"):
            object.__setattr__(self, name, clean(getattr(self, name), LIMITS[name]))
        for name in ("txn", "bundle_version", "slot"):
            object.__setattr__(self, name, clean_or_none(getattr(self, name), LIMITS[name]))
        d = self.downloaded
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_DOWNLOADED):
            object.__setattr__(self, "downloaded", None)
        try:
            object.__setattr__(self, "conflicts", _conflicts(self.conflicts))
        except ValueError:
            object.__setattr__(self, "conflicts", ())

    def to_json(self) -> dict[str, Any]:
        """The JSON form: the fields by name; `conflicts` only when there are any (so every
        other event reads as it always did)."""
        doc: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "conflicts"}
        if self.conflicts:
            doc["conflicts"] = [c.to_json() for c in self.conflicts]
        return doc

    @classmethod
    def from_json(cls, doc: object) -> Event:
        """An event from its JSON object (a stored file): unknown keys are ignored,
        `event` and `result` are required; raises ValueError naming the problem."""
        if not isinstance(doc, Mapping):
            raise ValueError("an event must be a JSON object")
        missing = [k for k in ("event", "result") if not isinstance(doc.get(k), str)]
        if missing:
            raise ValueError(f"event field {missing[0]!r} is missing or not a string")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = doc.get(f.name)
            if value is None:
                continue
            if f.name == "downloaded":
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_DOWNLOADED:
                    raise ValueError("event field 'downloaded' is not a byte count")
                values[f.name] = value
                continue
            if f.name == "conflicts":
                values[f.name] = _conflicts(value)
                continue
            if not isinstance(value, str):
                raise ValueError(f"event field {f.name!r} is not a string")
            values[f.name] = value
        return cls(**values)
