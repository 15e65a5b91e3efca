"""Helpers for the local API tests: the real daemon (`python -m agent.cli -c
CONFIG run`) as a child process on a simulated device, a raw JSON-lines client
on its real socket (written from docs/api.md, not from agent.api_client), and
an HTTP server on loopback that sends a bundle's first bytes and holds the rest
until the test releases it (an install that is reliably still running).

Owns only processes, sockets and waiting; every agent action goes through the
daemon, the CLI or the socket.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.e2e._sim import SimDevice

WAIT = 30.0  # seconds any wait in these tests may take before it fails


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def set_api(device: SimDevice, **keys: object) -> None:
    """Replace the [api] table of the device's config (the last table sim init writes)."""
    text = device.config.read_text()
    head, _, _ = text.partition("[api]")
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    device.config.write_text(f"{head}[api]\n{lines}")


class Daemon:
    """`ota-agent -c CONFIG run` as a child process, its log in a file."""

    def __init__(self, device: SimDevice, socket_path: Path | None = None) -> None:
        self.device = device
        self.socket = socket_path or device.dir / "agent.sock"
        self.log_path = device.dir.parent / f"{device.dir.name}-daemon-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "-c", str(device.config), "run"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> Daemon:
        def ready() -> bool:
            assert self.proc.poll() is None, f"the daemon exited with {self.proc.returncode}: {self.log()}"
            with contextlib.suppress(OSError), connect(self.socket):
                return True
            return False

        wait_for("the daemon's socket", ready)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = WAIT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        self._log.close()


@contextlib.contextmanager
def running(device: SimDevice, socket_path: Path | None = None) -> Iterator[Daemon]:
    """The daemon for the block; stopped with SIGTERM (a kill if it does not stop)."""
    daemon = Daemon(device, socket_path)
    try:
        yield daemon.wait_ready()
    finally:
        daemon.terminate()


def connect(path: Path) -> socket.socket:
    """A connection to the socket at `path`; a path longer than sun_path's 108
    bytes through a descriptor of its directory (/proc/self/fd/N/NAME)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    directory = None
    try:
        address = str(path)
        if len(os.fsencode(address)) > 107:
            directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
            address = f"/proc/self/fd/{directory}/{path.name}"
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    finally:
        if directory is not None:
            os.close(directory)
    return sock


class Client:
    """One connection to the API socket, speaking JSON lines."""

    def __init__(self, path: Path) -> None:
        self.sock = connect(path)
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, doc: dict[str, Any]) -> None:
        self.send_raw(json.dumps(doc).encode() + b"\n")

    def recv(self) -> dict[str, Any] | None:
        """The next answer, None at end of stream."""
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def answer(self) -> dict[str, Any]:
        doc = self.recv()
        assert doc is not None, "the daemon closed the connection"
        return doc

    def call(self, command: str, request_id: object = 1, **fields: Any) -> dict[str, Any]:
        """Send a request and return its first answer."""
        self.send({"id": request_id, "command": command, **fields})
        return self.answer()

    def until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Answers up to and including the first one `done` accepts."""
        seen = []
        while True:
            doc = self.answer()
            seen.append(doc)
            if done(doc):
                return seen


def status_over_socket(path: Path) -> dict[str, Any]:
    with Client(path) as c:
        doc = c.call("status")
    assert doc["reply"]["ok"], doc
    result: dict[str, Any] = doc["reply"]["result"]
    return result


class HeldBundleServer:
    """Serves one bundle at /bundle.otab on a loopback port: its first `hold_at`
    bytes at once, the rest only after `release()` (or after WAIT seconds)."""

    def __init__(self, bundle: Path, hold_at: int) -> None:
        data = bundle.read_bytes()
        self.gate = threading.Event()
        self.held = threading.Event()  # set once the first part went out
        gate, held = self.gate, self.held

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(data[:hold_at])
                    self.wfile.flush()
                    held.set()
                    gate.wait(WAIT)
                    self.wfile.write(data[hold_at:])
                    self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bundle.otab"

    def release(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=WAIT)


@contextlib.contextmanager
def held_bundle(bundle: Path, fraction: float = 0.6) -> Iterator[HeldBundleServer]:
    server = HeldBundleServer(bundle, int(bundle.stat().st_size * fraction))
    try:
        yield server
    finally:
        server.close()


def cli(device: SimDevice, *argv: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    """`ota-agent -c CONFIG ARGV...` as its own process (stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "-c", str(device.config), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def running_job(path: Path, phase: str = "writing") -> dict[str, Any]:
    """The daemon's running job once it reports progress in `phase`."""

    def job() -> dict[str, Any] | None:
        j = status_over_socket(path)["job"]
        return j if j and j["progress"] and j["progress"]["phase"] == phase else None

    found: dict[str, Any] = wait_for(f"a running job in phase {phase}", job)
    return found
