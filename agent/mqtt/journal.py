"""The job journal: every job the device accepted (or refused by policy), with
its current lifecycle status, durable before the broker gets its PUBACK.

One append-only file of framed records (4-byte length, 4-byte CRC-32, then a
JSON object), each appended with O_APPEND and fsynced before the call returns
(and the directory fsynced when the file is created). Loading replays the
records; a torn tail (a power cut mid-append: short frame or bad CRC) is cut
off at the first bad frame, so the journal always holds a prefix of what was
written. Memory and disk are bounded: the journal remembers the last
`capacity` jobs (dropping finished ones first) and is compacted (rewritten
atomically with `ota_common.fsutil.atomic_write`) when it holds more than about three
records per remembered job.

Forgetting a job raises the *watermark* to that job's `created` time: a job
created at or before the watermark that the journal does not know may be one
it forgot, so it is out of date and answered, not run. Together with dedup by
id this makes a replayed job harmless however old it is. (The watermark
follows the operators' clocks, not the device's: a job stamped far in the
future, once forgotten, makes every job stamped before that time out of date -
a loud refusal, never a second run.)

Owns the file and the records; the decisions (which job to accept, what to
answer) are intake.py's.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.mqtt.errors import JobError, JournalError, TopicError, TransitionError
from agent.mqtt.schema import Job, JobStatus, JobType, encode, format_time, job_document, parse_job, parse_time
from agent.mqtt.topics import check_name
from ota_common.fsutil import atomic_write, fsync_dir, make_dirs
from ota_common.text import clean

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 256
MIN_CAPACITY, MAX_CAPACITY = 8, 65536
MAX_RECORD = 16 * 1024
_FRAME = struct.Struct(">II")
Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What the journal knows of one job: the job itself (so a job accepted but not yet run
    can be handed to the application again after a restart) and its current status."""

    job: Job
    status: JobStatus
    reason: str = ""
    group: str | None = None
    updated: datetime | None = None

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def type(self) -> JobType:
        return self.job.type


class Journal:
    """Thread-safe: the MQTT network thread admits jobs while the application updates them."""

    def __init__(self, path: Path, *, capacity: int = DEFAULT_CAPACITY, clock: Clock = _utcnow) -> None:
        if not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
            raise ValueError(f"journal capacity {capacity} outside {MIN_CAPACITY}..{MAX_CAPACITY}")
        self.path = path
        self.capacity = capacity
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self._watermark: datetime | None = None
        self._records = 0
        self._load()

    # ---- queries ----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._jobs.get(job_id)

    @property
    def watermark(self) -> datetime | None:
        with self._lock:
            return self._watermark

    def out_of_date(self, created: datetime) -> bool:
        """True for a job the journal might have forgotten: created at or before the watermark."""
        with self._lock:
            return self._watermark is not None and created <= self._watermark

    def records(self) -> list[JobRecord]:
        """Every remembered job, oldest first."""
        with self._lock:
            return list(self._jobs.values())

    def unfinished(self) -> list[JobRecord]:
        """Jobs still queued, in progress or installed (not yet booted and committed), oldest first."""
        with self._lock:
            return [r for r in self._jobs.values() if not r.status.terminal]

    # ---- changes (each durable before it returns) ---------------------------------------------

    def admit(
        self, job: Job, *, status: JobStatus = JobStatus.QUEUED, reason: str = "", group: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Record `job` with `status`, unless its id is known: then the recorded entry and False.
        Durable (fsynced) when it returns (record, True)."""
        with self._lock:
            known = self._jobs.get(job.id)
            if known is not None:
                return known, False
            record = JobRecord(job, status, clean(reason), group, self.clock())
            self._append(_record_doc(record))
            self._jobs[job.id] = record
            self._evict()
            return record, True

    def set_status(self, job_id: str, status: JobStatus, reason: str = "") -> JobRecord:
        """Move a job to `status` (durably). The same status and reason again is a no-op;
        a move the lifecycle forbids is a `TransitionError`."""
        reason = clean(reason)
        with self._lock:
            old = self._jobs.get(job_id)
            if old is None:
                raise JournalError(f"job {clean(job_id, 80)} is not in the journal (never accepted, or forgotten)")
            if old.status is status and old.reason == reason:
                return old
            if not status.can_follow(old.status, old.type):
                raise TransitionError(job_id, old.status.value, status.value)
            record = replace(old, status=status, reason=reason, updated=self.clock())
            self._append({"op": "status", "id": job_id, "status": status.value, "reason": reason,
                          "at": format_time(self.clock())})
            self._jobs[job_id] = record
            return record

    # ---- storage --------------------------------------------------------------------------------

    def _append(self, doc: dict[str, Any]) -> None:
        frame = _frame(doc)
        if self._records >= 3 * self.capacity + 15:
            self._compact()
        created = not self.path.exists()
        try:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
        except OSError as e:
            raise JournalError(f"cannot write the job journal {self.path}: {e.strerror}") from None
        self._records += 1

    def _compact(self) -> None:
        docs: list[dict[str, Any]] = []
        if self._watermark is not None:
            docs.append({"op": "watermark", "created": format_time(self._watermark)})
        docs.extend(_record_doc(r) for r in self._jobs.values())
        try:
            atomic_write(self.path, b"".join(_frame(d) for d in docs), mode=0o600)
        except OSError as e:
            raise JournalError(f"cannot compact the job journal {self.path}: {e.strerror}") from None
        self._records = len(docs)

    def _evict(self) -> None:
        while len(self._jobs) > self.capacity:
            victim = next((r for r in self._jobs.values() if r.status.terminal), None)
            if victim is None:
                victim = next(iter(self._jobs.values()))
            del self._jobs[victim.id]
            mark = victim.job.created
            if self._watermark is None or mark > self._watermark:
                self._watermark = mark

    def _load(self) -> None:
        try:
            with self.path.open("rb") as f:
                data = f.read(self._max_file_bytes())
        except FileNotFoundError:
            return
        except OSError as e:
            raise JournalError(f"cannot read the job journal {self.path}: {e.strerror}") from None
        pos = 0
        while pos < len(data):
            doc = _unframe(data, pos)
            if doc is None:
                log.warning("job journal %s: cutting a torn tail of %d bytes at offset %d (power cut mid-write?)",
                            self.path, len(data) - pos, pos)
                self._truncate(pos)
                break
            pos += _FRAME.size + _FRAME.unpack_from(data, pos)[0]
            self._records += 1
            try:
                self._apply(doc)
            except (JobError, TopicError, KeyError, TypeError, ValueError) as e:
                log.warning("job journal %s: skipping a record it cannot read: %s", self.path, clean(e))
        while len(self._jobs) > self.capacity:
            self._evict()

    def _apply(self, doc: dict[str, Any]) -> None:
        op = doc["op"]
        if op == "watermark":
            mark = parse_time("created", doc["created"])
            if self._watermark is None or mark > self._watermark:
                self._watermark = mark
        elif op == "job":
            group = doc.get("group")
            record = JobRecord(
                job=parse_job(encode(doc["job"])), status=JobStatus(doc["status"]),
                reason=clean(doc.get("reason", "")), group=None if group is None else check_name("group", group),
                updated=parse_time("at", doc["at"]),
            )
            self._jobs.pop(record.id, None)
            self._jobs[record.id] = record
        elif op == "status":
            old = self._jobs.get(str(doc["id"]))
            if old is not None:
                self._jobs[old.id] = replace(old, status=JobStatus(doc["status"]), reason=clean(doc.get("reason", "")),
                                             updated=parse_time("at", doc["at"]))
        else:
            raise ValueError(f"unknown record op {clean(op, 20)!r}")

    def _max_file_bytes(self) -> int:
        """The most a journal this size can hold: compaction runs at 3 * capacity + 16 records."""
        return (3 * self.capacity + 17) * (_FRAME.size + MAX_RECORD)

    def _truncate(self, size: int) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise JournalError(f"cannot repair the job journal {self.path}: {e.strerror}") from None


def _record_doc(r: JobRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {"op": "job", "job": job_document(r.job), "status": r.status.value, "reason": r.reason,
                           "at": format_time(r.updated or datetime.now(UTC))}
    if r.group is not None:
        doc["group"] = r.group
    return doc


def _frame(doc: dict[str, Any]) -> bytes:
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_RECORD:
        raise JournalError(f"journal record of {len(body)} bytes exceeds {MAX_RECORD}")
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _unframe(data: bytes, pos: int) -> dict[str, Any] | None:
    if len(data) - pos < _FRAME.size:
        return None
    length, crc = _FRAME.unpack_from(data, pos)
    start = pos + _FRAME.size
    if length > MAX_RECORD or start + length > len(data):
        return None
    body = data[start : start + length]
    if zlib.crc32(body) != crc:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
