"""The wire schema, version 1: job documents (operator -> device) parsed into
typed values, the job lifecycle, and the report documents (device -> operator).

A job document is untrusted input. `parse_job` checks its size before anything
else (`MAX_JOB_BYTES`), decodes strict UTF-8 JSON (no duplicate keys, no NaN or
Infinity, integers of at most 20 digits, no fractions), takes exactly the keys
its type allows, and answers every violation with one specific `JobError`
line: the reason the device reports with status "rejected". Parsing is linear
in the (bounded) input and allocates nothing it has not bounded.

    {"schema": 1, "id": "job-42", "type": "install", "created": "2026-05-01T12:00:00Z",
     "expires": "2026-05-02T12:00:00Z", "url": "https://bundles.example/os-2.1.otab",
     "allow_downgrade": false}

The lifecycle follows AWS IoT Jobs (queued, in-progress, then succeeded,
failed, rejected, canceled or timed-out), with the two-phase truth of an
install: "installed" once the image is written and read back, "succeeded"
only after the new slot booted and committed, "rolled-back" (with the reason)
when the device went back to the old slot. `JobStatus.can_follow` holds that
an install can reach "succeeded" only through "installed".

Owns documents and values; no topics (topics.py), no IO.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from agent.mqtt.errors import JobError, TopicError
from agent.mqtt.topics import check_name
from ota_common import strictjson
from ota_common.text import clean

SCHEMA_VERSION = 1
MAX_JOB_BYTES = 16 * 1024
MAX_URL = 2048
MAX_INT_DIGITS = 20
MAX_TIME_TEXT = 40
MAX_BUNDLE_SIZE = 1 << 40
MIN_CHUNK, DEFAULT_CHUNK, MAX_CHUNK = 1024, 64 * 1024, 256 * 1024
MAX_REPORT_BYTES = 64 * 1024
MAX_DETAILS = 32
MAX_REPORT_CONFLICTS = 10  # /etc merge conflicts a job report lists
_CONFLICT_KEYS = {"path": 256, "kind": 64, "outcome": 64, "detail": 160}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class JobType(Enum):
    INSTALL = "install"
    INSTALL_STREAM = "install-stream"
    CANCEL = "cancel"
    REBOOT = "reboot"
    MARK_GOOD = "mark-good"
    ROLLBACK = "rollback"
    STATUS = "status"

    @property
    def installs(self) -> bool:
        return self in (JobType.INSTALL, JobType.INSTALL_STREAM)


class JobStatus(Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in-progress"
    INSTALLED = "installed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELED = "canceled"
    TIMED_OUT = "timed-out"
    ROLLED_BACK = "rolled-back"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.IN_PROGRESS, JobStatus.INSTALLED)

    def can_follow(self, old: JobStatus, job_type: JobType) -> bool:
        """Whether a job of `job_type` in status `old` may move to this status."""
        if self is JobStatus.INSTALLED:
            return old is JobStatus.IN_PROGRESS and job_type.installs
        if self is JobStatus.SUCCEEDED and job_type.installs:
            return old is JobStatus.INSTALLED  # two-phase truth: only a committed boot succeeds
        return self in _NEXT[old]


_S = JobStatus
_NEXT: dict[JobStatus, frozenset[JobStatus]] = {
    _S.QUEUED: frozenset({_S.IN_PROGRESS, _S.REJECTED, _S.CANCELED, _S.TIMED_OUT, _S.FAILED}),
    # in-progress -> rejected: the device refused the job's bundle or request (signature, policy,
    # compatibility, an unknown slot) after it started, before it changed anything.
    _S.IN_PROGRESS: frozenset({_S.SUCCEEDED, _S.FAILED, _S.REJECTED, _S.CANCELED, _S.TIMED_OUT}),
    _S.INSTALLED: frozenset({_S.SUCCEEDED, _S.ROLLED_BACK, _S.FAILED}),
    **{s: frozenset() for s in JobStatus if s.terminal},
}


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job. Fields beyond the common ones are set only for the types that take them."""

    id: str
    type: JobType
    created: datetime
    expires: datetime | None = None
    url: str | None = None  # install
    allow_downgrade: bool = False  # install, install-stream
    target: str | None = None  # cancel: the job to cancel
    size: int | None = None  # install-stream: bundle bytes
    sha256: str | None = None  # install-stream: bundle digest
    chunk_size: int = DEFAULT_CHUNK  # install-stream

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


_COMMON_REQUIRED = ("schema", "id", "type", "created")
_COMMON_OPTIONAL = ("expires",)
_TYPE_REQUIRED: dict[JobType, tuple[str, ...]] = {
    JobType.INSTALL: ("url",),
    JobType.INSTALL_STREAM: ("size", "sha256"),
    JobType.CANCEL: ("target",),
}
_TYPE_OPTIONAL: dict[JobType, tuple[str, ...]] = {
    JobType.INSTALL: ("allow_downgrade",),
    JobType.INSTALL_STREAM: ("allow_downgrade", "chunk_size"),
}
JOB_TYPES = ", ".join(t.value for t in JobType)


def parse_job(payload: bytes, topic_job_id: str | None = None) -> Job:
    """The job in `payload`, or a `JobError` saying exactly what is wrong. `topic_job_id`, when
    given, is the id the job's topic carries; the document must carry the same one."""
    doc = _decode(payload)
    schema = doc.get("schema")
    if "schema" not in doc:
        raise JobError("is required", field="schema")
    if type(schema) is not int:
        raise JobError(f"must be the integer {SCHEMA_VERSION}, got {_show(schema)}", field="schema")
    if schema != SCHEMA_VERSION:
        raise JobError(f"version {schema} is not supported (this device speaks {SCHEMA_VERSION})", field="schema")
    raw_type = doc.get("type")
    if "type" not in doc:
        raise JobError("is required", field="type")
    try:
        job_type = JobType(raw_type)
    except ValueError:
        raise JobError(f"{_show(raw_type)} is not a job type (one of {JOB_TYPES})", field="type") from None
    required = _COMMON_REQUIRED + _TYPE_REQUIRED.get(job_type, ())
    allowed = set(required + _COMMON_OPTIONAL + _TYPE_OPTIONAL.get(job_type, ()))
    for key in doc:
        if key not in allowed:
            raise JobError(f"unknown key {clean(key, 40)!r} for a {job_type.value} job (allowed: "
                           f"{', '.join(sorted(allowed))})")
    for key in required:
        if key not in doc:
            raise JobError(f"is required for a {job_type.value} job", field=key)
    job_id = _name("id", doc["id"])
    if topic_job_id is not None and job_id != topic_job_id:
        raise JobError(f"{job_id!r} differs from the job id {topic_job_id!r} in the topic", field="id")
    created = parse_time("created", doc["created"])
    expires = parse_time("expires", doc["expires"]) if "expires" in doc else None
    if expires is not None and expires <= created:
        raise JobError(f"{format_time(expires)} is not after created {format_time(created)}", field="expires")
    fields: dict[str, Any] = {}
    if "allow_downgrade" in doc:
        fields["allow_downgrade"] = _bool("allow_downgrade", doc["allow_downgrade"])
    if job_type is JobType.INSTALL:
        fields["url"] = _url(doc["url"])
    elif job_type is JobType.INSTALL_STREAM:
        fields["size"] = _int("size", doc["size"], 1, MAX_BUNDLE_SIZE)
        fields["sha256"] = _sha256(doc["sha256"])
        if "chunk_size" in doc:
            fields["chunk_size"] = _int("chunk_size", doc["chunk_size"], MIN_CHUNK, MAX_CHUNK)
    elif job_type is JobType.CANCEL:
        target = _name("target", doc["target"])
        if target == job_id:
            raise JobError("a job cannot cancel itself", field="target")
        fields["target"] = target
    return Job(id=job_id, type=job_type, created=created, expires=expires, **fields)


def _decode(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_JOB_BYTES:
        raise JobError(f"job is {len(payload)} bytes, more than the {MAX_JOB_BYTES} allowed")
    if not payload:
        raise JobError("job is empty")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError(f"job is not UTF-8 text (byte {e.start})") from None
    try:
        doc = strictjson.loads(text, max_digits=MAX_INT_DIGITS, integers_only=True)
    except strictjson.StrictJSONError as e:
        raise JobError(f"job is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise JobError(f"job must be a JSON object, got {_json_kind(doc)}")
    return doc



def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", str: "a string", list: "an array"}.get(type(value), "a value")


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(clean(value, 40))
    if isinstance(value, bool | int) or value is None:
        return json.dumps(value)
    return _json_kind(value)


def _name(key: str, value: object) -> str:
    try:
        return check_name(key, value)
    except TopicError as e:
        raise JobError(str(e).partition(": ")[2], field=key) from None


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise JobError(f"must be true or false, got {_show(value)}", field=key)
    return value


def _int(key: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:
        raise JobError(f"must be an integer, got {_show(value)}", field=key)
    if not low <= value <= high:
        raise JobError(f"{value} is outside {low}..{high}", field=key)
    return value


def _sha256(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise JobError(f"must be 64 lowercase hex digits, got {_show(value)}", field="sha256")
    return value


def _url(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise JobError(f"must be a non-empty string, got {_show(value)}", field="url")
    if len(value) > MAX_URL:
        raise JobError(f"is {len(value)} characters, more than the {MAX_URL} allowed", field="url")
    if not all(0x20 < ord(ch) < 0x7F for ch in value):
        raise JobError("must be printable ASCII without spaces (percent-encode the rest)", field="url")
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError as e:
        raise JobError(f"{clean(value, 80)!r} is not a URL: {e}", field="url") from None
    if parts.scheme not in ("http", "https", "oci", "oci+http"):  # oci: a bundle in a registry (agent.oci)
        raise JobError(f"scheme {clean(parts.scheme, 20)!r} is not http or https (or oci)", field="url")
    if not parts.hostname:
        raise JobError(f"{clean(value, 80)!r} has no host", field="url")
    if parts.username is not None or parts.password is not None:
        raise JobError("credentials in the URL are refused (they would be logged and journalled)", field="url")
    return value


def parse_time(key: str, value: object) -> datetime:
    """An ISO 8601 time with a zone (`2026-05-01T12:00:00Z`), as an aware UTC datetime."""
    if not isinstance(value, str) or not value or len(value) > MAX_TIME_TEXT:
        raise JobError(f"must be an ISO 8601 time such as 2026-05-01T12:00:00Z, got {_show(value)}", field=key)
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise JobError(f"{_show(value)} is not an ISO 8601 time such as 2026-05-01T12:00:00Z", field=key) from None
    if t.tzinfo is None:
        raise JobError(f"{_show(value)} has no time zone (end it with Z for UTC)", field=key)
    return t.astimezone(UTC)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_document(job: Job) -> dict[str, Any]:
    """The wire form of `job` (what an operator publishes; `parse_job` reads it back to an equal Job)."""
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "id": job.id, "type": job.type.value,
                           "created": format_time(job.created)}
    if job.expires is not None:
        doc["expires"] = format_time(job.expires)
    if job.type is JobType.INSTALL:
        doc["url"] = job.url
    if job.type is JobType.INSTALL_STREAM:
        doc.update(size=job.size, sha256=job.sha256, chunk_size=job.chunk_size)
    if job.type.installs and job.allow_downgrade:
        doc["allow_downgrade"] = True
    if job.type is JobType.CANCEL:
        doc["target"] = job.target
    return doc


# ---- reports (device -> operator) -------------------------------------------------------------

Scalar = str | int | float | bool | None


def new_report_id() -> str:
    """A fresh report id for an answer that does not come from the outbox (which has its own ids)."""
    return uuid.uuid4().hex


def job_report(
    *,
    report_id: str,
    device: str,
    job_id: str,
    status: JobStatus,
    time: datetime,
    reason: str = "",
    seq: int | None = None,
    duplicate: bool = False,
    group: str | None = None,
    running: str | None = None,
    dropped: int = 0,
    details: Mapping[str, Scalar] | None = None,
    conflicts: Sequence[Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """A job status report for `.../jobs/<job>/status`. `reason`, `details` and `conflicts` (the /etc
    merge's, each {path, kind, outcome, detail}) are cleaned and bounded here, so a foreign string
    can reach the operator only as one bounded line. Reports without conflicts carry no such key."""
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "id": report_id, "device": device, "job": job_id,
                           "status": status.value, "time": format_time(time)}
    if reason:
        doc["reason"] = clean(reason)
    if seq is not None:
        doc["seq"] = seq
    if duplicate:
        doc["duplicate"] = True
    if group is not None:
        doc["group"] = group
    if running is not None:
        doc["running"] = running
    if dropped:
        doc["dropped"] = dropped
    if details:
        doc["details"] = bounded_details(details)
    if conflicts:
        doc["conflicts"] = bounded_conflicts(conflicts)
    return doc


def bounded_conflicts(conflicts: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """At most `MAX_REPORT_CONFLICTS` conflicts, each with exactly the keys path, kind, outcome and
    detail, cleaned to bounded lines."""
    out: list[dict[str, str]] = []
    for c in list(conflicts)[:MAX_REPORT_CONFLICTS]:
        out.append({key: clean(c.get(key, ""), limit) for key, limit in _CONFLICT_KEYS.items()})
    return out


def bounded_details(details: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """At most `MAX_DETAILS` entries, keys and string values cleaned to one bounded line."""
    out: dict[str, Scalar] = {}
    for key, value in list(details.items())[:MAX_DETAILS]:
        out[clean(key, 40)] = clean(value) if isinstance(value, str) else value
    return out


def presence_report(device: str, online: bool, time: datetime | None = None) -> dict[str, Any]:
    """The retained `.../presence` document; the last will carries `online: false` and no time."""
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "device": device, "online": online}
    if time is not None:
        doc["time"] = format_time(time)
    return doc


def encode(doc: Mapping[str, Any]) -> bytes:
    """The one byte form of every document this layer publishes: compact, sorted keys, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_report(payload: bytes) -> dict[str, Any]:
    """A report as a dict, for the operator side and tests: bounded, JSON, schema 1, a device
    id; job reports also a valid job id and status. Anything else is a `JobError`."""
    if len(payload) > MAX_REPORT_BYTES:
        raise JobError(f"report is {len(payload)} bytes, more than the {MAX_REPORT_BYTES} allowed")
    try:
        doc = strictjson.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, strictjson.StrictJSONError) as e:
        raise JobError(f"report is not UTF-8 JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        raise JobError(f"report is not a schema {SCHEMA_VERSION} object")
    _name("device", doc.get("device"))
    if "job" in doc:
        _name("job", doc["job"])
        try:
            JobStatus(doc.get("status"))
        except ValueError:
            raise JobError(f"{_show(doc.get('status'))} is not a job status", field="status") from None
    return doc


# ---- install-stream chunks and credit (agent.mqtt.stream, bundler.fleet.stream) ------------------

CHUNK_HEADER = struct.Struct(">Q")  # a chunk message: the big-endian offset, then the chunk's bytes
MAX_CREDIT_BYTES = 1024


def chunk_message(offset: int, data: bytes) -> bytes:
    """A chunk's payload (the operator's side)."""
    return CHUNK_HEADER.pack(offset) + data


def credit_message(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_credit(payload: bytes) -> dict[str, Any] | None:
    """A credit document as the operator reads it; None if it is not one."""
    if len(payload) > MAX_CREDIT_BYTES:
        return None
    try:
        doc = strictjson.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, strictjson.StrictJSONError):
        return None
    if not isinstance(doc, dict):
        return None
    credit, offset = doc.get("credit"), doc.get("next")
    if type(credit) is not int or type(offset) is not int or credit < 0 or offset < 0:
        return None
    return doc
