"""Helpers for the serial console tests: pty pairs (the device's console opens the
subordinate side by path with pyserial, as it would /dev/ttyS0), a scripted
technician on the controlling side (send a line, expect a line, in the spirit of
paho-mqtt's scripted broker), a relay between two pty pairs that can be cut (a
cable pull) and rate-limited (a real line's speed), and the device's console
served in this process over a simulated device (`ConsolePort` with the `App` the
daemon would build).

The technician sees exactly the bytes on the wire: every assertion is about what
a real terminal would show.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import wiring
from agent.actions import App
from agent.console.port import ConsolePort
from tests.fixtures.serial_line import Pty, Relay

__all__ = ["Pty", "Relay", "Technician", "add_console", "served"]

WAIT = 20.0


class Technician:
    """The controlling side of the device's pty: what a person at a terminal types and reads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.seen: list[str] = []

    def send(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        view = memoryview(raw)
        deadline = time.monotonic() + WAIT
        while view:
            try:
                n = os.write(self.fd, view[:4096])
            except BlockingIOError:
                n = 0
            if not n:
                if time.monotonic() > deadline:
                    raise TimeoutError("the device does not read its console")
                select.select([], [self.fd], [], 0.05)
                self._drain()  # keep reading so the device never stalls writing
            view = view[n:]

    def line(self, text: str) -> None:
        self.send(text + "\r")

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self.buf += os.read(self.fd, 65536)

    def read_line(self, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                raw, self.buf = self.buf[:i], self.buf[i + 2 :]
                text = raw.decode("utf-8", "replace")
                self.seen.append(text)
                return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from the device; seen: {self.seen[-10:]}")
            select.select([self.fd], [], [], min(left, 0.1))
            self._drain()

    def expect(self, pattern: str, timeout: float = WAIT) -> str:
        """The first line matching `pattern` (regex search); earlier lines are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            if re.search(pattern, line):
                return line

    def reply(self, command: str | None = None, timeout: float = WAIT) -> dict[str, Any]:
        """The next JSON reply object (one with "ok"), of `command` when given."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            if not line.startswith("{"):
                continue
            doc = json.loads(line)
            if "ok" in doc and (command is None or doc.get("command") == command):
                return dict(doc)

    def wait_ready(self, timeout: float = WAIT) -> None:
        """Until the device's console answers (pyserial drops what came before it opened the port)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.line("progress")
            with contextlib.suppress(TimeoutError):
                self.expect("no job is running|in-progress|queued", 0.3)
                self.quiet(0.1)
                return
        raise TimeoutError("the device's console never answered")

    def quiet(self, seconds: float = 0.3) -> list[str]:
        """Every line that arrives within `seconds`."""
        out = []
        with contextlib.suppress(TimeoutError):
            while True:
                out.append(self.read_line(seconds))
        return out

    def run(self, command: str) -> dict[str, Any]:
        """JSON mode: `command`, confirmed with yes when asked, followed to its result."""
        self.line(command)
        name = command.split(maxsplit=1)[0]
        doc = self.reply(name)
        if doc.get("confirm"):
            self.line("yes")
            doc = self.reply(name)
        if doc.get("pending"):
            job = doc["job"]["id"]
            while True:
                doc = self.reply(name)
                if doc.get("done") and doc["job"]["id"] == job:
                    break
        return doc


def add_console(config: Path, port: str, **keys: Any) -> None:
    """Append a [console] table (TOML values from Python ones) to a device's agent.toml."""
    lines = ["", "[console]", f"ports = [{json.dumps(port)}]"]
    for k, v in keys.items():
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    with config.open("a") as f:
        f.write("\n".join(lines) + "\n")


@contextlib.contextmanager
def served(config: Path) -> Iterator[tuple[App, ConsolePort]]:
    """The config's console port served in this process over the device's App."""
    app = wiring.build_app(config)
    fronts = [f for f in wiring.front_ends(app) if isinstance(f, ConsolePort)]
    assert len(fronts) == 1, fronts
    front = fronts[0]
    front.start(app)
    try:
        yield app, front
    finally:
        front.stop()
