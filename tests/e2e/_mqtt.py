"""Helpers for the MQTT end-to-end tests: simulated devices configured for a
broker (`ota-agent sim init --mqtt ... --device-id ...`), the real daemon
(`ota-agent -c DIR/agent.toml run`) as a child process, an operator-side
`Watcher` that records every message it gets, an HTTP server whose bundle
download can be held at a gate (so a test acts "mid-install" exactly), and job
documents.

Owns no broker (tests/fixtures) and no agent logic: every action goes through
the real CLI, the real daemon and a real broker.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from agent import sim
from agent.crashpoint import ENV as CRASHPOINT_ENV
from agent.mqtt.topics import Topics
from tests.e2e._sim import COMPATIBLE, SLOT_SIZE, sha256_file
from tests.fixtures.watcher import Watcher, until

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "edge-ota/v1"


def job_doc(job_id: str, kind: str = "install", **fields: Any) -> bytes:
    doc = {"schema": 1, "id": job_id, "type": kind, "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           **fields}
    return json.dumps(doc).encode()


# ---- devices and daemons ------------------------------------------------------------------------


def make_mqtt_device(directory: Path, image: Path, keyring: Path, broker_url: str, device_id: str,
                     groups: tuple[str, ...] = ()) -> Path:
    """A simulated device whose agent.toml has the [mqtt] table `sim init --mqtt` writes."""
    sim.init(sim.SimSpec(directory=directory, image=image, keyring=keyring, compatible=COMPATIBLE,
                         slot_size=SLOT_SIZE, mqtt=broker_url, device_id=device_id, groups=groups))
    return sim.config_path(directory)


def edit_config(directory: Path, old: str, new: str) -> None:
    path = sim.config_path(directory)
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@dataclass
class Daemon:
    """`ota-agent -c CONFIG run` as a child process, its log in the device directory."""

    directory: Path
    crashpoint: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.directory / "daemon.log"

    def start(self) -> Daemon:
        env = {k: v for k, v in os.environ.items() if k not in (CRASHPOINT_ENV, "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        if self.crashpoint:
            env[CRASHPOINT_ENV] = self.crashpoint
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "-c", str(sim.config_path(self.directory)), "run"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM, wait, kill, wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


@contextlib.contextmanager
def daemons(*running: Daemon) -> Iterator[None]:
    """Stop every daemon afterwards, whatever happened."""
    try:
        yield
    finally:
        for d in running:
            d.stop()


# ---- the operator's side --------------------------------------------------------------------------


def job_statuses(watcher: Watcher, topics: Topics, job_id: str) -> list[str]:
    """The statuses reported for a job, in arrival order, each report once (by id)."""
    seen: dict[str, str] = {}
    for doc in watcher.docs(topics.job_status(job_id)):
        seen.setdefault(doc["id"], doc["status"])
    return list(seen.values())


def final_status(watcher: Watcher, topics: Topics, job_id: str) -> dict[str, Any] | None:
    terminal = {"succeeded", "failed", "rejected", "canceled", "timed-out", "rolled-back"}
    done = [d for d in watcher.docs(topics.job_status(job_id)) if d["status"] in terminal]
    return done[-1] if done else None


def wait_final(watcher: Watcher, topics: Topics, job_id: str, timeout: float = 90) -> dict[str, Any]:
    until(lambda: final_status(watcher, topics, job_id), f"a final status of job {job_id}", timeout)
    doc = final_status(watcher, topics, job_id)
    assert doc is not None
    return doc


def wait_online(watcher: Watcher, topics: Topics, daemon: Daemon, timeout: float = 60) -> None:
    """Until the daemon published its retained status (it is connected and subscribed)."""

    def up() -> bool:
        if not daemon.running:
            raise AssertionError(f"the daemon exited: {daemon.log_text()[-3000:]}")
        return bool(watcher.on(topics.status))

    until(up, f"device {topics.device} to come online", timeout)


def outbox_lines(directory: Path) -> list[dict[str, Any]]:
    """The records in a device's outbox file; a line being appended right now is skipped."""
    path = directory / "state" / "outbox.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        _, _, body = line.partition(b" ")
        with contextlib.suppress(ValueError):
            out.append(json.loads(body))
    return out


def fingerprint(directory: Path) -> dict[str, str]:
    """SHA-256 of the slots, the bootloader state and every file of the state directory,
    leaving out atomic writes' temporary files (`.NAME.TOKEN.tmp`, there only mid-write)."""
    paths = [directory / "slot-A.img", directory / "slot-B.img", directory / "bootloader.json"]
    paths += sorted(p for p in (directory / "state").rglob("*") if not p.name.endswith(".tmp"))
    out = {}
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            if p.is_file():
                out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


# ---- a bundle server with a gate ---------------------------------------------------------------------


class Gate:
    """Holds every download after `after` bytes until `open()`; `reached` is set when one waits."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.reached = threading.Event()
        self._open = threading.Event()
        self.requests = 0

    def open(self) -> None:
        self._open.set()

    def wait(self) -> None:
        self.reached.set()
        self._open.wait(120)


class _GatedHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args: Any, root: Path, gate: Gate | None, **kwargs: Any) -> None:
        self.root = root
        self.gate = gate
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        if self.gate is not None:
            self.gate.requests += 1
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        cut = min(self.gate.after, len(data)) if self.gate is not None else len(data)
        self.wfile.write(data[:cut])
        self.wfile.flush()
        if self.gate is not None:
            self.gate.wait()
        self.wfile.write(data[cut:])

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def bundle_server(root: Path, gate: Gate | None = None) -> Iterator[Callable[[str], str]]:
    """Serve `root`; yields `url(name)`. With a gate, each download stops at `gate.after` bytes until it opens."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_GatedHandler, root=root, gate=gate))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield lambda name: f"http://127.0.0.1:{server.server_address[1]}/{name}"
    finally:
        if gate is not None:
            gate.open()
        server.shutdown()
        server.server_close()
        thread.join(10)
