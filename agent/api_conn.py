"""One client of the local API, as the server's loop (`agent.api_server`) sees
it: what it sent, split into request lines of bounded length; what waits to be
sent to it, bounded in answers and bytes and written without ever blocking;
and the job updates it follows, rate-limited.

Owns buffers and bounds, not the protocol (`agent.api_protocol`) and not the
selector (the server registers the socket and decides when to close it).
"""

from __future__ import annotations

import collections
import socket
import struct
from dataclasses import dataclass, field

from agent.api_protocol import MAX_LINE
from agent.commands import Command
from agent.jobs import JobState, JobView

MIN_INTERVAL = 0.2  # seconds between two progress updates of one job to one client
MAX_QUEUED = 64  # answers waiting for one client ...
MAX_QUEUED_BYTES = 4 << 20  # ... and their bytes; past either the client is dropped
RECV_SIZE = 64 * 1024
TOO_LONG = b"\n"  # what next_line() returns for a line past MAX_LINE (a real line never holds a newline)
_PEERCRED = struct.Struct("3i")


Milestone = tuple[str, JobState, str | None, int]


def milestone(view: JobView) -> Milestone:
    """What an update must change to pass the rate limit at once: the job, its
    state, its phase, or the quarter of the phase it reached (so 25, 50, 75 and
    100 % are always seen)."""
    p = view.progress
    quarter = min(4, 4 * p.done // p.total) if p is not None and p.total > 0 else 0
    return view.id, view.state, p.phase if p else None, quarter


@dataclass
class JobStream:
    """Job updates to one client, for one followed job (`command` set) or for a
    subscription (every job), rate-limited: a view is sent at once when its
    `milestone` differs from the last one sent or MIN_INTERVAL has passed;
    otherwise it is kept (`pending`) and sent when that interval is up, the
    newer replacing the older. Until `open` (the request's first answer is out)
    updates are `held`, the newest kept."""

    request_id: object
    command: Command | None
    open: bool = False
    held: JobView | None = None
    last_key: Milestone | None = None
    last_sent: float = 0.0
    pending: JobView | None = None
    status_key: str | None = None  # subscriptions: the last status sent

    def offer(self, view: JobView, now: float) -> JobView | None:
        """The view to send now, or None when it is held back by the rate limit."""
        key = milestone(view)
        if key != self.last_key or now - self.last_sent >= MIN_INTERVAL:
            self.last_key, self.last_sent, self.pending = key, now, None
            return view
        self.pending = view
        return None

    def due(self) -> float | None:
        return self.last_sent + MIN_INTERVAL if self.pending is not None else None

    def take_due(self, now: float) -> JobView | None:
        if self.pending is None or now < self.last_sent + MIN_INTERVAL:
            return None
        view, self.pending, self.last_sent = self.pending, None, now
        return view


@dataclass
class Client:
    sock: socket.socket
    last_active: float
    peer: str = ""
    inbuf: bytearray = field(default_factory=bytearray)
    skipping: bool = False  # discarding the rest of a too-long line
    busy: bool = False  # a request of this client is being run; its next line waits
    eof: bool = False  # the client sent everything it will send
    out: collections.deque[bytes] = field(default_factory=collections.deque)
    out_offset: int = 0
    out_bytes: int = 0
    watches: dict[str, JobStream] = field(default_factory=dict)  # followed jobs by id
    subscription: JobStream | None = None
    close_by: float | None = None  # closing: answers are flushed until then
    events: int = 0  # what the selector watches for
    closed: bool = False

    def __post_init__(self) -> None:
        self.peer = self.peer or _peer(self.sock)

    @property
    def idle(self) -> bool:
        """Nothing asked, nothing followed, nothing to send: the idle timeout runs."""
        return not (self.busy or self.watches or self.subscription or self.out or self.eof
                    or self.close_by is not None)

    @property
    def done(self) -> bool:
        """It sent all it will send and everything is answered."""
        return self.eof and not (self.inbuf or self.busy or self.watches or self.subscription)

    @property
    def wants_read(self) -> bool:
        return not (self.busy or self.eof or self.close_by is not None)

    def streams(self) -> list[JobStream]:
        return [*self.watches.values(), *([self.subscription] if self.subscription else [])]

    def receive(self) -> bool:
        """Read what the client sent; False when the connection failed."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            self.eof = True
        self.inbuf += data
        return True

    def next_line(self) -> bytes | None:
        """The next request line (without its line ending), TOO_LONG for one past
        MAX_LINE (its rest is skipped), None until a whole line arrived; the last
        line of a client that closed its side needs no newline."""
        while True:
            newline = self.inbuf.find(b"\n")
            if self.skipping:
                if newline < 0:
                    self.inbuf.clear()
                    return None
                del self.inbuf[: newline + 1]
                self.skipping = False
                continue
            if newline >= MAX_LINE or (newline < 0 and len(self.inbuf) >= MAX_LINE):
                self.skipping = True
                return TOO_LONG
            if newline < 0 and not (self.eof and self.inbuf):
                return None
            end = newline if newline >= 0 else len(self.inbuf)
            line = bytes(self.inbuf[:end]).rstrip(b"\r")
            del self.inbuf[: end + 1]
            if line.strip():
                return line

    def queue(self, data: bytes) -> bool:
        """Queue an answer; False when the client already has too many unread ones."""
        if len(self.out) >= MAX_QUEUED or self.out_bytes + len(data) > MAX_QUEUED_BYTES:
            return False
        self.out.append(data)
        self.out_bytes += len(data)
        return True

    def flush(self) -> bool:
        """Write what the socket takes now; False when the connection failed."""
        while self.out:
            head = self.out[0]
            try:
                sent = self.sock.send(memoryview(head)[self.out_offset :])
            except BlockingIOError:
                return True
            except OSError:
                return False
            self.out_offset += sent
            if self.out_offset == len(head):
                self.out.popleft()
                self.out_bytes -= len(head)
                self.out_offset = 0
        return True


def _peer(sock: socket.socket) -> str:
    """Who connected, for the log (SO_PEERCRED)."""
    try:
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return "an unknown peer"
    return f"uid {uid} (pid {pid})"
