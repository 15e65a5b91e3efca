"""The job queue: one state-changing job at a time, whatever front end asked.

Owns job identity, the lifecycle (queued -> running -> succeeded | failed |
canceled), progress fan-out to every subscriber, cancellation requests and the
"busy" answer. Does not own what a job does: a job is a callable that receives
a `JobContext` (report progress, check for cancellation) and returns a result
value. The daemon runs jobs on one worker thread; a standalone CLI runs them
inline with `run_inline`.

A second job while one runs is refused at once with `BusyError` naming the running
job (front ends answer "busy", they never wait silently). Read-only commands do not
go through the queue.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agent.errors import BusyError, CanceledError
from ota_common.errors import OtaError
from ota_common.text import clean

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


@dataclass(frozen=True, slots=True)
class Progress:
    """Byte-weighted progress of the running phase, with an ETA when it can be told."""

    phase: str
    done: int
    total: int
    eta_seconds: float | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        eta = None if self.eta_seconds is None else round(self.eta_seconds, 1)
        return {"phase": self.phase, "done": self.done, "total": self.total, "percent": round(self.percent, 1),
                "eta_seconds": eta}


@dataclass(frozen=True, slots=True)
class JobView:
    """What every front end sees of a job: a value, safe to hand to other threads."""

    id: str
    command: str
    origin: str
    state: JobState
    progress: Progress | None = None
    result: Any = None  # the command's result value when it succeeded
    error: str | None = None
    error_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "command": self.command,
            "origin": self.origin,
            "state": self.state.value,
            "progress": self.progress.to_json() if self.progress else None,
            "result": jsonable(self.result),
            "error": self.error,
            "error_type": self.error_type,
        }


def jsonable(value: Any) -> Any:
    """A result value as JSON data: its own `to_json()`, else a dataclass's fields,
    enums by value (the command table's renderings are the front ends' forms)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


Listener = Callable[[JobView], None]


class JobContext:
    """Handed to a running job: report progress, and learn whether it was canceled."""

    def __init__(self, queue: JobQueue, job_id: str) -> None:
        self._queue = queue
        self.job_id = job_id
        self._cancel = threading.Event()
        self._phase = ""
        self._phase_started = time.monotonic()

    def progress(self, phase: str, done: int, total: int) -> None:
        """Report progress; raises CanceledError at this safe point when a cancel was asked for."""
        now = time.monotonic()
        if phase != self._phase:
            self._phase, self._phase_started = phase, now
        elapsed = now - self._phase_started
        eta = (total - done) * elapsed / done if done > 0 and elapsed > 0.5 and total >= done else None
        self._queue._update(self.job_id, progress=Progress(phase, done, total, eta))
        self.check_canceled()

    def check_canceled(self) -> None:
        if self._cancel.is_set():
            raise CanceledError(f"job {self.job_id} canceled")

    @property
    def canceled(self) -> bool:
        return self._cancel.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        """Set when a cancel is asked for: for waits that must end at once (a retry backoff)."""
        return self._cancel


@dataclass
class _Entry:
    view: JobView
    context: JobContext
    work: Callable[[JobContext], Any]
    done: threading.Event = field(default_factory=threading.Event)


class JobQueue:
    """At most one job runs; `submit` refuses a second with BusyError."""

    def __init__(self, history: int = 32) -> None:
        self._lock = threading.Lock()
        self._current: _Entry | None = None
        self._recent: list[JobView] = []
        self._history = history
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def running(self) -> JobView | None:
        with self._lock:
            return self._current.view if self._current else None

    def get(self, job_id: str) -> JobView | None:
        with self._lock:
            if self._current and self._current.view.id == job_id:
                return self._current.view
            return next((v for v in reversed(self._recent) if v.id == job_id), None)

    def submit(
        self, command: str, work: Callable[[JobContext], Any], *, origin: str, job_id: str | None = None
    ) -> JobView:
        """Start `work` on a worker thread; returns the queued job. BusyError when one runs."""
        entry = self._claim(command, work, origin, job_id)
        threading.Thread(target=self._run, args=(entry,), name=f"job-{entry.view.id}", daemon=True).start()
        return entry.view

    def run_inline(
        self, command: str, work: Callable[[JobContext], Any], *, origin: str, job_id: str | None = None
    ) -> JobView:
        """Run `work` in this thread and return the finished job."""
        entry = self._claim(command, work, origin, job_id)
        self._run(entry)
        return entry.view

    def wait(self, job_id: str, timeout: float | None = None) -> JobView | None:
        with self._lock:
            entry = self._current if self._current and self._current.view.id == job_id else None
        if entry is not None:
            entry.done.wait(timeout)
        return self.get(job_id)

    def cancel(self, job_id: str | None = None) -> JobView:
        """Ask the running job (or the one named) to stop at its next safe point."""
        with self._lock:
            entry = self._current
        if entry is None or (job_id is not None and entry.view.id != job_id):
            raise OtaError(f"no running job {clean(job_id, 64)}" if job_id else "no job is running")
        entry.context._cancel.set()
        return entry.view

    def _claim(self, command: str, work: Callable[[JobContext], Any], origin: str, job_id: str | None) -> _Entry:
        job_id = clean(job_id, 64) if job_id else uuid.uuid4().hex[:12]
        with self._lock:
            if self._current is not None:
                running = self._current.view
                raise BusyError(running.id, running.command)
            entry = _Entry(JobView(job_id, command, clean(origin, 64), JobState.QUEUED), JobContext(self, job_id), work)
            self._current = entry
        self._notify(entry.view)
        return entry

    def _run(self, entry: _Entry) -> None:
        self._update(entry.view.id, state=JobState.RUNNING)
        try:
            result = entry.work(entry.context)
        except CanceledError as e:
            self._finish(entry, JobState.CANCELED, error=str(e), error_type=type(e).__name__)
        except OtaError as e:
            self._finish(entry, JobState.FAILED, error=str(e), error_type=type(e).__name__)
        except Exception as e:  # a bug must not wedge the queue: report it and free the slot
            log.exception("job %s (%s) crashed", entry.view.id, entry.view.command)
            self._finish(entry, JobState.FAILED, error=f"internal error: {clean(e)}", error_type=type(e).__name__)
        else:
            self._finish(entry, JobState.SUCCEEDED, result=result)

    def _finish(self, entry: _Entry, state: JobState, **changes: Any) -> None:
        with self._lock:
            view = replace(entry.view, state=state, **changes)
            entry.view = view
            self._current = None
            self._recent = [*self._recent, view][-self._history :]
        self._notify(view)  # front ends get the final update before any waiter wakes
        entry.done.set()

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            entry = self._current
            if entry is None or entry.view.id != job_id:
                return
            entry.view = replace(entry.view, **changes)
            view = entry.view
        self._notify(view)

    def _notify(self, view: JobView) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(view)
            except Exception:  # one broken front end must not stop a job or the others
                log.exception("job listener failed")
