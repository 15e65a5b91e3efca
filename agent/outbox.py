"""The durable status outbox (`STATE_DIR/outbox.log`) and `EventLog`, the
front door that logs an event and appends it there.

Every report is appended (and fsynced) before anyone may send it, and stays
until a transport acknowledges it. Delivery is at least once and in order:
`pending()` lists the unacknowledged records oldest first, `ack(seq)`
acknowledges every record up to and including `seq`. A record redelivered
after a crash is byte-for-byte the same, with the same `id`, so the receiving
side deduplicates on `id`.

Files (all in STATE_DIR):
  outbox.log    one record per line: `<crc32 of JSON, 8 hex> <JSON>\\n`. The JSON
                object is {"seq", "id", "dropped", "event", "result", "reason",
                "txn", "bundle_version", "slot", "time", "downloaded"}, and
                "conflicts" for an install whose /etc merge had any.
  outbox.acked  the highest acknowledged seq (`N\\n`), replaced atomically.
  outbox.lock   flock'd around every read-modify-write (several processes append).

Framing: a line whose CRC or JSON does not check is skipped, so a torn append
(power cut mid-write; appends are fsynced before they return, so only an append
that never returned can be torn) never hides the records around it. Before
appending, a file that does not end in "\\n" gets one first. When a scan finds
skipped lines the file is rewritten without them (atomically), a file with a
bad line that is not just a torn tail is first set aside as
`outbox.log.corrupt-<time>`, and an `outbox: repaired` record carrying
`dropped: N` says how many were lost. A file larger than the reader accepts or
unreadable is set aside too; the complete records of its first `read_limit`
bytes are kept and a notice says so. Nothing is emptied silently.

Sequence ids are monotonic: the next one is above both the highest record in
the file and the acknowledged mark, so after a restart (or after everything
was acknowledged and compacted away) numbering continues. Event ids are
random (uuid4), fixed when the record is first written.

Acknowledgement is a marker, not a rewrite: `ack` replaces `outbox.acked`
atomically; acknowledged records are removed later by an atomic rewrite of
`outbox.log` (when they take a quarter of the byte budget, or when room is
needed). Every step is a single atomic replace or an fsynced append, so a
power cut between any two steps leaves a consistent pair: at worst records
already acknowledged are delivered again (the documented duplicate case).

Bounds: at most `max_bytes` (256 KiB) and `max_records` (1024). When an append
does not fit, acknowledged records go first (free), then progress records
(oldest first, down to three quarters of the budget so the next appends are
cheap), then the oldest results, only as many as needed. Never silently: the
record whose append forced the drop carries `dropped: N`, N counting every
record lost before it (including what earlier dropped records had carried), and
it is written in the same atomic rewrite that drops them, so the count is
durable and never double counted. Sequence gaps say which records are gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.crashpoint import crashpoint
from agent.events import (
    CONFLICT_LIMITS,
    LIMITS,
    MAX_CONFLICTS,
    MAX_DOWNLOADED,
    Clock,
    EtcConflict,
    Event,
    EventType,
    Result,
    iso,
    utcnow,
)
from agent.storefile import describe_os_error, ensure_dir, flocked, read_bounded, set_aside
from ota_common.errors import OtaError
from ota_common.fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)

FILE = "outbox.log"
ACKED_FILE = "outbox.acked"
LOCK_FILE = "outbox.lock"
MAX_OUTBOX_BYTES = 256 * 1024
MAX_OUTBOX_RECORDS = 1024
MAX_SEQ = (1 << 63) - 1
PROGRESS = "progress"


@dataclass(frozen=True, slots=True)
class Record:
    """One report in the outbox: `seq` orders it, `id` identifies it for
    deduplication, `dropped` counts reports lost just before it."""

    seq: int
    id: str
    event: Event
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "id": self.id, "dropped": self.dropped, **self.event.to_json()}

    @classmethod
    def from_json(cls, doc: object) -> Record:
        if not isinstance(doc, Mapping):
            raise ValueError("a record must be a JSON object")
        seq, rid, dropped = doc.get("seq"), doc.get("id"), doc.get("dropped", 0)
        if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
            raise ValueError("record seq is not an integer in range")
        if type(dropped) is not int or not 0 <= dropped <= MAX_SEQ:
            raise ValueError("record dropped is not an integer in range")
        if not isinstance(rid, str) or not 1 <= len(rid) <= 64 or not rid.isascii() or not rid.isalnum():
            raise ValueError("record id is not a short alphanumeric string")
        return cls(seq, rid, Event.from_json(doc), dropped)


def encode(record: Record) -> bytes:
    body = json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    line = b"%08x %s\n" % (zlib.crc32(body), body)
    if len(line) > MAX_RECORD_BYTES:
        raise AssertionError(f"outbox record of {len(line)} bytes exceeds its bound {MAX_RECORD_BYTES}")
    return line


def decode(line: bytes) -> Record:
    """One line without its newline; raises ValueError if it does not check."""
    if len(line) < 10 or line[8:9] != b" ":
        raise ValueError("not a framed record")
    head, body = line[:8], line[9:]
    if not all(c in b"0123456789abcdef" for c in head) or int(head, 16) != zlib.crc32(body):
        raise ValueError("CRC mismatch")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON: {e}") from None
    return Record.from_json(doc)


def _worst_case_record_bytes() -> int:
    """Every field at its limit in 4-byte UTF-8 characters (the most any
    cleaned character costs in JSON without ASCII escaping), ids at their maximum."""
    widest = {name: "\U0001f600" * limit for name, limit in LIMITS.items()}
    conflict = EtcConflict(**{name: "\U0001f600" * limit for name, limit in CONFLICT_LIMITS.items()})
    event = Event(**widest, downloaded=MAX_DOWNLOADED, conflicts=(conflict,) * MAX_CONFLICTS)
    doc = Record(MAX_SEQ, "f" * 64, event, MAX_SEQ).to_json()
    body = json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    return 9 + len(body) + 1


MAX_RECORD_BYTES = _worst_case_record_bytes()


@dataclass(slots=True)
class _Line:
    record: Record
    size: int  # bytes in the file, newline included


@dataclass(slots=True)
class Parsed:
    """What a scan of outbox bytes found: the records that check, in file order,
    and how many lines did not (complete lines, and a torn last line)."""

    lines: list[_Line] = field(default_factory=list)
    bad_lines: int = 0
    torn_tail: bool = False
    ends_with_newline: bool = True

    @property
    def size(self) -> int:
        return sum(line.size for line in self.lines)


def parse(data: bytes) -> Parsed:
    """Pure and linear in `len(data)`: the fuzzing entry point for the reader."""
    out = Parsed(ends_with_newline=not data or data.endswith(b"\n"))
    last_seq = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl
        raw = data[pos:end]
        size = end - pos + (1 if nl >= 0 else 0)
        pos = end + 1
        if not raw:
            continue
        try:
            record = decode(raw)
            if record.seq <= last_seq:
                raise ValueError("sequence id out of order")
        except ValueError:
            if nl < 0:
                out.torn_tail = True
            else:
                out.bad_lines += 1
            continue
        last_seq = record.seq
        out.lines.append(_Line(record, size))
    return out


_Key = tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]


@dataclass(slots=True)
class _View:
    """The outbox as this process last saw it, valid while the file's identity
    (inode, size, mtime) is unchanged."""

    key: _Key | None
    parsed: Parsed
    acked: int

    @property
    def next_seq(self) -> int:
        last = self.parsed.lines[-1].record.seq if self.parsed.lines else 0
        return max(last, self.acked) + 1

    def unacked(self) -> list[_Line]:
        return [line for line in self.parsed.lines if line.record.seq > self.acked]


class Outbox:
    def __init__(
        self,
        state_dir: Path,
        clock: Clock = utcnow,
        *,
        max_bytes: int = MAX_OUTBOX_BYTES,
        max_records: int = MAX_OUTBOX_RECORDS,
    ) -> None:
        if max_bytes < 4 * MAX_RECORD_BYTES or max_records < 4:
            raise ValueError(f"outbox bounds too small: at least {4 * MAX_RECORD_BYTES} bytes and 4 records")
        self.dir = state_dir
        self.path = state_dir / FILE
        self.acked_path = state_dir / ACKED_FILE
        self.clock = clock
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.read_limit = 2 * max_bytes + MAX_RECORD_BYTES
        self._mutex = threading.Lock()
        self._view: _View | None = None

    # --- public API -------------------------------------------------------

    def append(self, event: Event) -> Record:
        """Persist `event` as the newest record; returns it once it is durable. A
        full, read-only or failing disk is an OtaError naming the outbox (one line)."""
        try:
            return self._append(event)
        except OSError as e:
            raise OtaError(f"cannot append the report to the outbox {self.path}: {e.strerror or e}") from None

    def _append(self, event: Event) -> Record:
        with self._locked():
            view = self._current()
            record = Record(view.next_seq, uuid.uuid4().hex, event)
            line = encode(record)
            extra = 0 if view.parsed.ends_with_newline else 1
            over_bytes = view.parsed.size + extra + len(line) > self.max_bytes
            if over_bytes or len(view.parsed.lines) + 1 > self.max_records:
                return self._rewrite_with(view, record)
            self._append_line((b"" if extra == 0 else b"\n") + line, view, record)
            return record

    def pending(self) -> list[Record]:
        """Unacknowledged records, oldest first."""
        with self._locked():
            return [line.record for line in self._current().unacked()]

    def ack(self, seq: int) -> None:
        """Acknowledge every record up to and including `seq`."""
        with self._locked():
            view = self._current()
            if seq >= view.next_seq:
                raise ValueError(f"cannot acknowledge seq {seq}: the newest record is {view.next_seq - 1}")
            if seq <= view.acked:
                return
            atomic_write(self.acked_path, b"%d\n" % seq)
            crashpoint("outbox-after-ack")
            view.acked = seq
            view.key = self._key()
            acked_bytes = sum(line.size for line in view.parsed.lines if line.record.seq <= seq)
            if acked_bytes >= self.max_bytes // 4:
                self._rewrite(view, [line.record for line in view.unacked()])

    # --- reading ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads and other processes, one outbox operation at a time."""
        with self._mutex, flocked(self.dir / LOCK_FILE):
            yield

    def _key(self) -> _Key:
        """Identity of the outbox and of the acknowledged mark: when neither changed,
        what this process parsed last is still what the disk holds."""
        out: list[tuple[int, int, int] | None] = []
        for path in (self.path, self.acked_path):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return (out[0], out[1])

    def _current(self) -> _View:
        """The outbox as it is on disk now (re-read only if another process or a
        crash changed it), repaired if a scan found lines that do not check."""
        key = self._key()
        if self._view is not None and self._view.key == key:
            return self._view
        acked = self._read_acked()
        try:
            data = read_bounded(self.path, self.read_limit)
        except FileNotFoundError:
            self._view = _View(key, Parsed(), acked)
            return self._view
        except OSError as e:
            if isinstance(e, PermissionError):
                raise  # the wrong user, not a damaged file
            return self._recover(acked, Parsed(), f"unreadable ({describe_os_error(e)})", aside=True)
        if len(data) > self.read_limit:
            salvage = parse(data[: data.rfind(b"\n", 0, self.read_limit) + 1])
            return self._recover(acked, salvage, f"larger than {self.read_limit} bytes", aside=True)
        parsed = parse(data)
        if parsed.bad_lines:
            lost = parsed.bad_lines + parsed.torn_tail
            return self._recover(acked, parsed, f"{lost} record(s) failed their checks", aside=True, lost=lost)
        if parsed.torn_tail:
            return self._recover(acked, parsed, "a torn record at its end (power cut during an append)", lost=1)
        self._view = _View(key, parsed, acked)
        return self._view

    def _read_acked(self) -> int:
        try:
            raw = read_bounded(self.acked_path, 32)
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning(
                "outbox: ignoring unreadable %s (%s); unacknowledged reports are resent",
                self.acked_path,
                describe_os_error(e),
            )
            return 0
        text = raw.decode("ascii", "replace").strip()
        if not text.isdigit() or len(text) > 19:
            log.warning("outbox: ignoring corrupt %s; unacknowledged reports are resent", self.acked_path)
            return 0
        return int(text)

    def _recover(self, acked: int, kept: Parsed, problem: str, *, aside: bool = False, lost: int = 0) -> _View:
        """Replace a damaged outbox by the records that checked plus a notice."""
        where = ""
        if aside:
            with contextlib.suppress(FileNotFoundError):  # another process set it aside first
                where = f"; the file was moved to {set_aside(self.path, self.clock()).name}"
        kept.ends_with_newline = True
        view = _View(None, Parsed(lines=kept.lines), acked)
        reason = f"outbox repaired: {problem}; {len(kept.lines)} record(s) kept{where}"
        log.warning("%s", reason)
        notice = Record(
            view.next_seq,
            uuid.uuid4().hex,
            Event(event=EventType.OUTBOX, result=Result.REPAIRED, reason=reason, time=iso(self.clock())),
        )
        self._rewrite(view, [line.record for line in view.unacked()] + [replace(notice, dropped=lost)])
        assert self._view is not None
        return self._view

    # --- writing ------------------------------------------------------------

    def _append_line(self, data: bytes, view: _View, record: Record) -> None:
        ensure_dir(self.dir)
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        created = False
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        try:
            view_ = memoryview(data)
            while view_:
                view_ = view_[os.write(fd, view_) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.dir)  # the new file's directory entry is durable too
        view.parsed.lines.append(_Line(record, len(data)))
        view.parsed.ends_with_newline = True
        view.key = self._key()

    def _rewrite(self, view: _View, records: list[Record]) -> None:
        ensure_dir(self.dir)
        lines = [encode(r) for r in records]
        atomic_write(self.path, b"".join(lines))
        self._view = _View(
            self._key(), Parsed([_Line(r, len(b)) for r, b in zip(records, lines, strict=True)]), view.acked
        )

    def _rewrite_with(self, view: _View, record: Record) -> Record:
        """Make room for `record` by the drop policy, then write everything at once."""
        keep = view.unacked()
        reserve = len(encode(replace(record, dropped=MAX_SEQ)))
        hard_bytes, hard_count = self.max_bytes - reserve, self.max_records - 1
        low_bytes, low_count = self.max_bytes * 3 // 4 - reserve, self.max_records * 3 // 4 - 1
        total = sum(line.size for line in keep)
        dropped: list[_Line] = []

        def over(limit_bytes: int, limit_count: int) -> bool:
            return total > limit_bytes or len(keep) > limit_count

        if over(hard_bytes, hard_count):
            for line in [x for x in keep if x.record.event.event == PROGRESS]:
                if not over(low_bytes, low_count):
                    break
                keep.remove(line)
                dropped.append(line)
                total -= line.size
            while keep and over(hard_bytes, hard_count):
                line = keep.pop(0)
                dropped.append(line)
                total -= line.size
        if dropped:
            lost = sum(1 + line.record.dropped for line in dropped)
            record = replace(record, dropped=min(lost, MAX_SEQ))
            progress = sum(line.record.event.event == PROGRESS for line in dropped)
            log.warning(
                "outbox full: dropped %d unsent report(s) (%d progress); report %d carries dropped=%d",
                len(dropped),
                progress,
                record.seq,
                record.dropped,
            )
        self._rewrite(view, [line.record for line in keep] + [record])
        return record


class EventLog:
    """Logs each event as one line and appends it to the outbox."""

    def __init__(self, state_dir: Path, clock: Clock = utcnow) -> None:
        self.clock = clock
        self.outbox = Outbox(state_dir, clock)

    def emit(self, event: Event, *, level: int = logging.INFO) -> Event:
        if not event.time:
            event = replace(event, time=iso(self.clock()))
        log.log(level, "%s", describe(event), extra={"ota_event": event.to_json()})
        self.outbox.append(event)
        return event


def describe(event: Event) -> str:
    parts = [f"{event.event}: {event.result}"]
    if event.bundle_version:
        parts.append(f"version {event.bundle_version}")
    if event.slot:
        parts.append(f"slot {event.slot}")
    if event.reason:
        parts.append(f"- {event.reason}")
    if event.downloaded is not None:
        parts.append(f"({event.downloaded} bytes downloaded)")
    return " ".join(parts)
