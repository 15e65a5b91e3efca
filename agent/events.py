"""Structured events: one record feeds the log and the status outbox.

Fixed field names (`event`, `txn`, `bundle_version`, `slot`, `result`,
`reason`, `time`). The outbox (`STATE_DIR/outbox.jsonl`) keeps every report
until a transport has delivered it; each append is fsynced, so a power cut
loses no report that was acknowledged to the caller. It is bounded: when the
file passes `MAX_OUTBOX_BYTES` it is cut to half that, dropping progress
records first, then the oldest. Appends only stat the file; the file is read
and rewritten only when a cut is due.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.errors import ConfigError
from hw.fsutil import atomic_write, open_regular, read_regular

log = logging.getLogger(__name__)

MAX_OUTBOX_BYTES = 256 * 1024
MAX_OUTBOX_READ = 4 * MAX_OUTBOX_BYTES  # what a read takes in at most (appends trim at MAX_OUTBOX_BYTES)
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    result: str
    reason: str = ""
    txn: str | None = None
    bundle_version: str | None = None
    slot: str | None = None
    time: str = ""


class EventLog:
    def __init__(self, state_dir: Path, clock: Clock = utcnow) -> None:
        self.path = state_dir / "outbox.jsonl"
        self.clock = clock

    def emit(self, event: Event) -> Event:
        if not event.time:
            event = Event(**{**asdict(event), "time": iso(self.clock())})
        parts = [f"{event.event}: {event.result}"]
        if event.bundle_version:
            parts.append(f"version {event.bundle_version}")
        if event.slot:
            parts.append(f"slot {event.slot}")
        if event.reason:
            parts.append(f"- {event.reason}")
        log.info("%s", " ".join(parts), extra={"ota_event": asdict(event)})
        self._append(event)
        return event

    def _append(self, event: Event) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(event), sort_keys=True) + "\n"
        try:
            fd = open_regular(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise ConfigError(str(self.path), "", f"cannot open the outbox: {e.strerror}") from None
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._trim()

    def pending(self) -> list[Event]:
        try:
            lines = read_regular(self.path, MAX_OUTBOX_READ).decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConfigError(str(self.path), "", f"cannot read the outbox: {e.strerror}") from None
        out = []
        for line in lines:
            try:
                out.append(Event(**json.loads(line)))
            except (ValueError, TypeError):
                log.warning("outbox: skipping a corrupt record (torn write before a power cut?)")
        return out

    def _trim(self) -> None:
        if self.path.stat().st_size <= MAX_OUTBOX_BYTES:
            return
        lines = [json.dumps(asdict(e), sort_keys=True) + "\n" for e in self.pending()]
        excess = sum(len(line) for line in lines) - MAX_OUTBOX_BYTES // 2
        keep = [True] * len(lines)
        for progress_first in (True, False):
            for i, line in enumerate(lines):
                if excess <= 0:
                    break
                if keep[i] and (not progress_first or '"event": "progress"' in line):
                    keep[i] = False
                    excess -= len(line)
        atomic_write(self.path, "".join(line for line, k in zip(lines, keep, strict=True) if k).encode())
