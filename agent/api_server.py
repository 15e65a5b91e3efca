"""The local API front end `ota-agent run` hosts: the command table served as
JSON lines on a UNIX socket (wire format: `agent.api_protocol`; the socket
file: `agent.api_socket`; for people: docs/api.md).

One thread runs a selector loop over the listening socket and every client;
one worker thread runs the commands (reads of the device state never stall
the loop); jobs run on the job queue's own threads. The job queue's updates
reach the loop through a wake-up socket and are never waited for: a job never
blocks on a client.

Everything a client sends is untrusted and bounded: a request line of at most
64 KiB (a longer one is answered `line-too-long` and skipped), one request of a
client at a time (its next line is read when the answer is queued), at most
`max_clients` clients (one more is answered `too-many-clients` and closed), an
idle client is closed after `idle_timeout`, and at most 64 answers (4 MiB) wait
for a client: one that does not read them is dropped. Progress to a client is
at most 5 updates a second per job, but never without a state change, a new
phase or a quarter of one reached; followed jobs end with their reply. Closing
a connection never cancels a job.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import queue
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent import api_protocol as proto
from agent.actions import App
from agent.api_conn import TOO_LONG, Client, JobStream, milestone
from agent.api_protocol import Code, Request, RequestError
from agent.api_socket import Listener
from agent.commands import Command, Reply, execute, reply_of
from agent.config import ApiConfig
from agent.errors import BusyError
from agent.jobs import JobState, JobView
from ota_common.errors import OtaError
from ota_common.text import clean

log = logging.getLogger(__name__)

STATUS_POLL = 5.0  # seconds between status checks while someone is subscribed
CLOSE_GRACE = 2.0  # seconds a closing client gets to read its last answers
STOP_GRACE = 30.0  # seconds a job started while stopping gets to reach its safe point
ACCEPT_PAUSE = 1.0  # seconds without accepting after running out of file descriptors


def front_ends(config: ApiConfig) -> list[ApiServer]:
    """The API front end, when the config enables it."""
    return [ApiServer(config)] if config.enabled else []


class ApiServer:
    name = "api"

    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self._app: App | None = None
        self._listener: Listener | None = None
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, Client] = {}
        self._inbox: collections.deque[JobView | Callable[[], None]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._stopping = False
        self._finished = False
        self._accept_paused_until = 0.0
        self._last_job_state: tuple[str, JobState] | None = None
        self._status_in_flight = False
        self._status_again = False
        self._next_poll = 0.0

    # --- lifecycle (the daemon's thread) -------------------------------------------

    def start(self, app: App) -> None:
        self._app = app
        self._listener = Listener(self.config)  # raises ApiError: the daemon does not start half-served
        for s in (self._wake_r, self._wake_w, self._listener.sock):
            s.setblocking(False)
        self._sel.register(self._listener.sock, selectors.EVENT_READ, self._accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._wake)
        self._unsubscribe = app.queue.subscribe(self._on_job_thread)
        for target, name in ((self._loop, "api"), (self._work, "api-worker")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("local API listening on %s (mode %04o)", self.config.socket, self.config.mode)

    def stop(self) -> None:
        if self._app is None:
            return
        app = self._app
        self._post(self._begin_stop)  # no new connections or requests from here on
        running = app.queue.running()
        if running is not None:  # started after the daemon canceled its job: stop it at a safe point too
            with contextlib.suppress(OtaError):
                app.queue.cancel(running.id)
            app.queue.wait(running.id, timeout=STOP_GRACE)
        self._post(self._finish_stop)
        self._tasks.put(None)
        for thread in self._threads:
            thread.join(timeout=CLOSE_GRACE + 5)
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._listener is not None:
            self._listener.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self._app = None

    # --- from other threads ----------------------------------------------------------

    def _on_job_thread(self, view: JobView) -> None:
        """A job queue listener: runs on the job's thread, must never block."""
        with self._inbox_lock:
            last = self._inbox[-1] if self._inbox else None
            if isinstance(last, JobView) and _same_progress_run(last, view):
                self._inbox[-1] = view  # the loop is behind: the newer progress replaces the older
                return
            self._inbox.append(view)
        self._wakeup()

    def _post(self, fn: Callable[[], None]) -> None:
        with self._inbox_lock:
            self._inbox.append(fn)
        self._wakeup()

    def _wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            task()

    def _at_worker(self, fn: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Run `fn` on the worker thread, then `then(result or exception)` on the loop."""

        def task() -> None:
            try:
                result: Any = fn()
            except Exception as e:
                result = e
            self._post(lambda: then(result))

        self._tasks.put(task)

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._finished:
                self._dispatch(self._sel.select(self._timeout()))
                self._drain_inbox()
                self._timers()
        except Exception:
            log.exception("local API: the server loop failed; the API is no longer served")
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)

    def _dispatch(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in ready:
            handler: Callable[[int], None] = key.data
            self._guarded(functools.partial(handler, mask), key.fileobj)

    def _guarded(self, fn: Callable[[], None], fileobj: object = None) -> None:
        try:
            fn()
        except Exception:
            log.exception("local API: error serving a client")
            conn = self._conns.get(fileobj.fileno()) if isinstance(fileobj, socket.socket) else None
            if conn is not None:
                self._close(conn)

    def _drain_inbox(self) -> None:
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    return
                item = self._inbox.popleft()
            if isinstance(item, JobView):
                self._guarded(functools.partial(self._on_job, item))
            else:
                self._guarded(item)

    def _wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = []
        for conn in self._conns.values():
            if conn.close_by is not None:
                deadlines.append(conn.close_by)
            elif conn.idle:
                deadlines.append(conn.last_active + self.config.idle_timeout)
            deadlines += [d for s in conn.streams() if (d := s.due()) is not None]
        if self._accept_paused_until:
            deadlines.append(self._accept_paused_until)
        if self._subscribers():
            deadlines.append(self._next_poll)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _timers(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if conn.close_by is not None:
                if now >= conn.close_by:
                    self._close(conn)
                continue
            if conn.idle and now >= conn.last_active + self.config.idle_timeout:
                self._send(conn, proto.error(None, Code.IDLE_TIMEOUT,
                                             f"closing: nothing asked for {self.config.idle_timeout:g} s"))
                self._closing(conn)
                continue
            for stream in conn.streams():
                view = stream.take_due(now)
                if view is not None:
                    self._send(conn, {"id": stream.request_id, "progress": proto.view_json(view)})
        if self._accept_paused_until and now >= self._accept_paused_until and self._listener is not None:
            self._accept_paused_until = 0.0
            self._sel.register(self._listener.sock, selectors.EVENT_READ, self._accept)
        if self._subscribers() and now >= self._next_poll:
            self._refresh_status()

    # --- connections ---------------------------------------------------------------------

    def _accept(self, mask: int) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of file descriptors: stop accepting for a moment, do not spin
                log.warning("local API: cannot accept a client: %s", e.strerror)
                self._sel.unregister(self._listener.sock)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            sock.setblocking(False)
            if len(self._conns) >= self.config.max_clients:
                log.warning("local API: refusing a client: %d clients are connected", len(self._conns))
                with contextlib.suppress(OSError):
                    sock.send(proto.encode(proto.error(
                        None, Code.TOO_MANY_CLIENTS,
                        f"{self.config.max_clients} clients are connected; try again later")))
                sock.close()
                continue
            conn = Client(sock, time.monotonic())
            self._conns[sock.fileno()] = conn
            self._update_events(conn)

    def _conn_event(self, conn: Client) -> Callable[[int], None]:
        def handle(mask: int) -> None:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and not conn.closed:
                self._readable(conn)

        return handle

    def _update_events(self, conn: Client) -> None:
        if conn.closed:
            return
        events = 0
        if conn.wants_read:
            events |= selectors.EVENT_READ
        if conn.out:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        if conn.events and events:
            self._sel.modify(conn.sock, events, self._conn_event(conn))
        elif events:
            self._sel.register(conn.sock, events, self._conn_event(conn))
        else:
            self._sel.unregister(conn.sock)
        conn.events = events

    def _readable(self, conn: Client) -> None:
        if not conn.receive():
            self._close(conn)
            return
        conn.last_active = time.monotonic()
        self._process(conn)

    def _process(self, conn: Client) -> None:
        """Handle the complete lines received, one request at a time."""
        while not (conn.busy or conn.closed or conn.close_by is not None):
            line = conn.next_line()
            if line is None:
                break
            if line is TOO_LONG:
                self._send(conn, proto.error(None, Code.LINE_TOO_LONG,
                                             f"request line longer than {proto.MAX_LINE - 1} bytes; skipped"))
            else:
                self._request(conn, line)
        if conn.done:
            self._closing(conn)
        self._update_events(conn)

    def _send(self, conn: Client, doc: dict[str, Any]) -> None:
        if conn.closed:
            return
        if not conn.queue(proto.encode(doc)):
            log.warning("local API: dropping client %s: it does not read its answers", conn.peer)
            self._close(conn)
            return
        self._flush(conn)

    def _flush(self, conn: Client) -> None:
        if conn.closed:
            return
        if not conn.flush() or (conn.close_by is not None and not conn.out):
            self._close(conn)
            return
        self._update_events(conn)

    def _closing(self, conn: Client) -> None:
        """Close once the queued answers are read (or CLOSE_GRACE passed)."""
        if conn.close_by is None:
            conn.close_by = time.monotonic() + CLOSE_GRACE
        self._flush(conn)

    def _close(self, conn: Client) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self._sel.unregister(conn.sock)
        self._conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        conn.watches.clear()
        conn.subscription = None

    # --- requests ------------------------------------------------------------------------

    def _request(self, conn: Client, line: bytes) -> None:
        try:
            req = proto.parse(line)
        except RequestError as e:
            self._send(conn, proto.error(e.request_id, e.code, str(e), **e.extra))
            return
        if self._stopping:
            self._send(conn, proto.error(req.id, Code.SHUTTING_DOWN, "the agent is stopping"))
            return
        if req.command is None:
            self._subscribe(conn, req)
        elif req.command.changes_state:
            self._start_job(conn, req, req.command)
        else:
            self._read_only(conn, req, req.command)

    def _read_only(self, conn: Client, req: Request, command: Command) -> None:
        app = self._app
        assert app is not None

        def done(result: object) -> None:
            if isinstance(result, Reply):
                self._answered(conn, proto.reply(req.id, result))
            else:
                self._answered(conn, self._failure(req, command, result))

        if command.name == "cancel":
            log.info("local API: cancel requested by %s", conn.peer)
        conn.busy = True
        self._at_worker(lambda: execute(app, command.name, req.args, origin=req.origin), done)

    def _start_job(self, conn: Client, req: Request, command: Command) -> None:
        app = self._app
        assert app is not None
        job_id = uuid.uuid4().hex[:12]
        if req.follow:
            conn.watches[job_id] = JobStream(req.id, command)  # before the job exists: no update is missed
        log.info("local API: %s requested by %s as job %s", command.name, conn.peer, job_id)

        def done(result: object) -> None:
            if isinstance(result, Reply) and result.job is not None:
                stream = conn.watches.get(job_id)
                self._answered(conn, {"id": req.id, "job": proto.view_json(result.job)},
                               None if stream is None else functools.partial(self._open, conn, stream, result.job))
                return
            conn.watches.pop(job_id, None)
            if isinstance(result, BusyError):
                doc = proto.error(req.id, Code.BUSY, str(result), type="BusyError", job=result.job_id,
                                  command=result.command)
            else:
                doc = self._failure(req, command, result)
            self._answered(conn, doc)

        conn.busy = True
        self._at_worker(
            lambda: execute(app, command.name, req.args, origin=req.origin, job_id=job_id, wait=False), done
        )

    def _subscribe(self, conn: Client, req: Request) -> None:
        app = self._app
        assert app is not None
        if conn.subscription is not None:
            self._send(conn, proto.error(req.id, Code.BAD_REQUEST, "already subscribed on this connection"))
            return
        stream = conn.subscription = JobStream(req.id, None)

        def done(result: object) -> None:
            if conn.subscription is not stream:
                return
            if isinstance(result, dict):
                stream.status_key = _status_key(result)
                self._answered(conn, {"id": req.id, "status": result}, functools.partial(self._open, conn, stream))
            else:
                conn.subscription = None
                self._answered(conn, self._failure(req, None, result))

        conn.busy = True
        self._next_poll = time.monotonic() + STATUS_POLL
        self._at_worker(lambda: app.status().to_json(), done)

    def _answered(self, conn: Client, doc: dict[str, Any], then: Callable[[], object] | None = None) -> None:
        """Send a request's first answer, run `then`, and go on with the client's next request."""
        conn.busy = False
        self._send(conn, doc)
        if then is not None and not conn.closed:
            then()
        self._process(conn)

    def _failure(self, req: Request, command: Command | None, error: object) -> dict[str, Any]:
        if isinstance(error, OtaError) and command is not None:  # the command ran and failed
            return proto.reply(req.id, Reply(command.name, False, None, str(error), error=str(error),
                                             error_type=type(error).__name__))
        log.error("local API: internal error answering %s: %r", command.name if command else "subscribe", error)
        return proto.error(req.id, Code.INTERNAL, f"internal error: {clean(error, 200)}")

    # --- job updates and status ---------------------------------------------------------------

    def _open(self, conn: Client, stream: JobStream, answered: JobView | None = None) -> None:
        """The request's first answer (`answered`: the job it accepted) is out:
        deliver the newest update held meanwhile, unless that answer said it all."""
        stream.open = True
        held, stream.held = stream.held, None
        if held is not None and held != answered and not (stream.command and held.state is JobState.QUEUED):
            self._deliver(conn, stream, held)

    def _on_job(self, view: JobView) -> None:
        for conn in list(self._conns.values()):
            stream = conn.watches.get(view.id)
            if stream is not None:
                self._deliver(conn, stream, view)
            if conn.subscription is not None and not conn.closed:
                self._deliver(conn, conn.subscription, view)
        if (view.id, view.state) != self._last_job_state:
            self._last_job_state = (view.id, view.state)
            self._refresh_status()

    def _deliver(self, conn: Client, stream: JobStream, view: JobView) -> None:
        if not stream.open:
            stream.held = view
            return
        if stream.command is not None and view.state.final:
            conn.watches.pop(view.id, None)
            self._send(conn, {"id": stream.request_id, "progress": proto.view_json(view)})
            self._send(conn, proto.reply(stream.request_id, reply_of(stream.command, view)))
            if conn.eof:
                self._process(conn)
            return
        sent = stream.offer(view, time.monotonic())
        if sent is not None:
            self._send(conn, {"id": stream.request_id, "progress": proto.view_json(sent)})

    def _subscribers(self) -> list[Client]:
        return [c for c in self._conns.values() if c.subscription is not None and c.subscription.open]

    def _refresh_status(self) -> None:
        """Read the status on the worker; send it to every subscriber it changed for."""
        self._next_poll = time.monotonic() + STATUS_POLL
        if not self._subscribers() or self._app is None:
            return
        if self._status_in_flight:
            self._status_again = True
            return
        self._status_in_flight = True

        def done(result: object) -> None:
            self._status_in_flight = False
            if isinstance(result, dict):
                key = _status_key(result)
                for conn in self._subscribers():
                    sub = conn.subscription
                    if sub is not None and sub.status_key != key:
                        sub.status_key = key
                        self._send(conn, {"id": sub.request_id, "status": result})
            else:
                log.warning("local API: cannot read the status for subscribers: %s", clean(result, 200))
            if self._status_again:
                self._status_again = False
                self._refresh_status()

        app = self._app
        self._at_worker(lambda: app.status().to_json(), done)

    # --- stopping (posted by stop()) ---------------------------------------------------------

    def _begin_stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            if not self._accept_paused_until:
                self._sel.unregister(self._listener.sock)
            self._accept_paused_until = 0.0
            self._listener.close()  # the socket file goes: new clients run standalone
            self._listener = None

    def _finish_stop(self) -> None:
        """Every followed job has ended by now: make sure its reply is out, then close."""
        app = self._app
        for conn in list(self._conns.values()):
            for job_id, stream in list(conn.watches.items()):
                view = app.queue.get(job_id) if app else None
                if view is not None and view.state.final:
                    stream.open = True
                    self._deliver(conn, stream, view)
            self._closing(conn)
        self._finished = True
        deadline = time.monotonic() + CLOSE_GRACE
        while self._conns and time.monotonic() < deadline:  # flush the last answers
            self._dispatch(self._sel.select(max(0.0, deadline - time.monotonic())))


def _same_progress_run(older: JobView, newer: JobView) -> bool:
    """Two running updates of one job where the older carries nothing the newer
    does not: the same milestone (phase and quarter)."""
    return older.state is newer.state is JobState.RUNNING and milestone(older) == milestone(newer)


def _status_key(doc: dict[str, Any]) -> str:
    """What must differ for subscribers to get a new status: not the job's progress."""
    job = doc.get("job")
    reduced = {**doc, "job": [job.get("id"), job.get("state")] if isinstance(job, dict) else None}
    return json.dumps(reduced, sort_keys=True, default=str)
