"""A scripted, hostile HTTP server on a loopback port, for the tests of the
bundle sources' bounds.

Each accepted connection gets its request head read (bounded) and is then handed
to the test's script, a function of one `Peer`: it writes whatever bytes the test
wants (a chunk size of -1, endless headers, a trickle) with the helpers below.
"Endless" streams stop after `ENDLESS` bytes, so that a client without bounds
(the code these tests guard against) still ends, with its memory showing what it
buffered, instead of hanging the suite. Every helper stops as soon as the client
goes away or the server closes; `close()` leaves no thread or socket behind.

Also here: `set_download()`, which gives a simulated device a `[download]` table,
and `assert_refused()`, the checks every refused install must pass.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

from tests.e2e._sim import SimDevice, Snapshot

ENDLESS = 256 << 20  # bytes an "endless" stream sends before giving up
MAX_REQUEST = 64 * 1024
STATE_LIMIT = 4096  # state.json stays this small whatever the server sent

Script = Callable[["Peer"], None]


class Peer:
    """One accepted connection whose request head has been read."""

    def __init__(self, sock: socket.socket, stop: threading.Event, request: bytes) -> None:
        self.sock = sock
        self.stop = stop
        self.request = request

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False once the client went away or the server stops."""
        if self.stop.is_set():
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def send_forever(self, piece: bytes, budget: int = ENDLESS) -> None:
        """`piece` again and again, until `budget` bytes went out or the client left."""
        block = piece * max(1, (64 * 1024) // max(len(piece), 1))
        sent = 0
        while sent < budget and self.send(block):
            sent += len(block)

    def trickle(self, data: bytes, every: float, step: int = 1) -> None:
        """`data`, `step` bytes every `every` seconds."""
        for i in range(0, len(data), step):
            if not self.send(data[i : i + step]) or self.stop.wait(every):
                return

    def trickle_forever(self, piece: bytes, every: float) -> None:
        while self.send(piece) and not self.stop.wait(every):
            pass

    def hold(self) -> None:
        """Answer nothing, keep the connection open until the server closes."""
        self.stop.wait()


class HostileServer:
    def __init__(self, script: Script) -> None:
        self._script = script
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.requests: list[bytes] = []
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def url(self, path: str = "update.otab") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._conns.append(conn)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = _read_request(conn, self._stop)
            if request is None:
                return
            with self._lock:
                self.requests.append(request)
            self._script(Peer(conn, self._stop, request))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._acceptor.join(timeout=10)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=10)


def _read_request(conn: socket.socket, stop: threading.Event) -> bytes | None:
    conn.settimeout(0.1)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST:
        if stop.is_set():
            return None
        try:
            piece = conn.recv(4096)
        except TimeoutError:
            continue
        if not piece:
            return None
        data += piece
    conn.settimeout(None)
    return data


def servers() -> Iterator[Callable[[Script], HostileServer]]:
    """Body of each test file's `hostile` fixture: `hostile(script)` starts a
    server; all of them are closed afterwards."""
    started: list[HostileServer] = []

    def start(script: Script) -> HostileServer:
        server = HostileServer(script)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for s in started:
            s.close()


def set_download(device: SimDevice, **values: float) -> None:
    """Append a `[download]` table to the device's agent.toml."""
    table = "".join(f"{k} = {v}\n" for k, v in values.items())
    device.config.write_text(device.config.read_text() + f"\n[download]\n{table}")


def response(head: str, body: bytes = b"") -> bytes:
    """A response head given with "\\n" line ends (sent as CRLF), then `body`."""
    return open_head(head) + b"\r\n" + body


def open_head(head: str) -> bytes:
    """The lines of a response head, each ended by CRLF, without the empty line
    that would end the head."""
    return head.strip("\n").replace("\n", "\r\n").encode("latin-1") + b"\r\n"


def assert_refused(device: SimDevice, before: Snapshot, url: str, fragment: str) -> str:
    """Install from `url` fails with one error line holding `fragment`, exit 1;
    slots and bootloader unchanged; status works; state.json stays small."""
    run = device.install(url)
    line = run.one_error_line()
    assert run.rc == 1
    assert fragment in line, line
    after = device.snapshot()
    unchanged = (before.slot("A"), before.slot("B"), before.bootloader)
    assert (after.slot("A"), after.slot("B"), after.bootloader) == unchanged
    doc = device.status()
    assert (doc["booted"], doc["primary"]) == ("A", "A")
    last = doc["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert fragment in last["reason"]
    state = device.dir / "state" / "state.json"
    assert state.stat().st_size < STATE_LIMIT
    return line
