"""`ota-console PORT put BUNDLE`: send a bundle over the serial console in frames
(`ota_common.frames`), under the device's credit, resuming after a reconnect.

The send loop: `upload SIZE SHA256` (confirmed or signed like any state-changing
command), then frames from the offset the device wants, never past the limit its
last `@ack` granted. A `@nak` (a damaged or refused frame) or a repeated `@ack`
(the device's "send again" after a silence) rewinds to the offset it names (go
back N; frames the device already holds are ignored there as duplicates). No line
from the device for `timeout` seconds means the line is gone: the port is closed
and opened again until `reconnect` seconds passed, then `upload ... --resume`
re-attaches and the device says where to go on. The device's result of the
install ends it. The bundle is read from its file frame by frame, never whole.

Owns the send loop; not the wire (bundler.console.link).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bundler.console.link import ConsoleError, DeviceError, DeviceLink, LinkLost
from ota_common.frames import Control, encode, parse_control
from ota_common.tty import Progress

log = logging.getLogger(__name__)

RECONNECT = 120.0  # seconds to keep trying to get the line back


@dataclass
class PutStats:
    frames: int = 0
    resent: int = 0
    naks: int = 0
    reconnects: int = 0
    payload: int = 0
    wire: int = 0


def sha256_of(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class _Sender:
    def __init__(self, link: DeviceLink, f: BinaryIO, size: int, *, transfer: int, frame: int, start: int,
                 stats: PutStats, progress: Callable[[int, int], None]) -> None:
        self.link, self.f, self.size = link, f, size
        self.transfer, self.frame = transfer, frame
        self.sent = start  # the next offset to send
        self.acked = start
        self.limit = start
        self.last_ack: int | None = None
        self.high = start  # the highest offset ever sent (resends are below it)
        self.stats = stats
        self.progress = progress

    def on_control(self, c: Control) -> None:
        if c.transfer != self.transfer:
            return
        if c.kind == "nak":
            self.stats.naks += 1
            log.info("device refused a frame: %s; sending from %d", c.reason, c.next)
            self.sent = min(self.sent, c.next)
        else:
            if c.next == self.last_ack and c.next < self.sent:  # "send again from here"
                self.sent = c.next
            self.last_ack = c.next
            self.limit = max(self.limit, c.limit) if c.next >= self.acked else c.limit
        self.acked = max(self.acked, c.next)
        self.progress(self.acked, self.size)

    def pump(self) -> None:
        while self.sent < min(self.limit, self.size):
            self.f.seek(self.sent)
            payload = self.f.read(min(self.frame, self.size - self.sent))
            data = encode(self.transfer, self.sent, payload)
            self.link.write(data)
            self.stats.frames += 1
            if self.sent < self.high:
                self.stats.resent += 1
            self.stats.payload += len(payload)
            self.stats.wire += len(data)
            self.sent += len(payload)
            self.high = max(self.high, self.sent)


def put(link: DeviceLink, bundle: Path, *, allow_downgrade: bool = False, reconnect: float = RECONNECT,
        progress: Callable[[int, int], None] | None = None, on_notice: Callable[[dict[str, Any]], None] | None = None,
        stats: PutStats | None = None) -> dict[str, Any]:
    """Upload and install `bundle`; the device's final reply (DeviceError when it failed)."""
    size, digest = sha256_of(bundle)
    stats = stats or PutStats()
    bar = Progress("upload", unit="MiB")
    show = progress or bar
    resume = False
    try:
        with bundle.open("rb") as f:
            while True:
                try:
                    return _attempt(link, f, size, digest, allow_downgrade=allow_downgrade, resume=resume, stats=stats,
                                    progress=show, on_notice=on_notice)
                except LinkLost as e:
                    log.warning("%s; reconnecting", e)
                    stats.reconnects += 1
                    resume = True
                    _reconnect(link, reconnect)
    finally:
        bar.finish()


def _attempt(link: DeviceLink, f: BinaryIO, size: int, digest: str, *, allow_downgrade: bool, resume: bool,
             stats: PutStats, progress: Callable[[int, int], None],
             on_notice: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    line = f"upload {size} {digest}" + (" --allow-downgrade" if allow_downgrade else "") + \
        (" --resume" if resume else "")
    early: list[Control] = []
    reply = link.call(line, follow=False, on_control=early.append, on_notice=on_notice)
    if reply.get("done"):
        return reply  # it had finished while the line was down
    result = reply.get("result") or {}
    try:
        transfer, frame, start = int(result["transfer"]), int(result["frame"]), int(result["next"])
        job = str(result["job"])
    except (KeyError, TypeError, ValueError):
        raise ConsoleError(f"the device's upload answer is not understood: {reply}") from None
    sender = _Sender(link, f, size, transfer=transfer, frame=frame, start=start, stats=stats, progress=progress)
    for c in early:
        sender.on_control(c)
    while True:
        sender.pump()
        done = _poll(link, job, sender, on_notice)
        if done is not None:
            return done


def _poll(link: DeviceLink, job: str, sender: _Sender,
          on_notice: Callable[[dict[str, Any]], None] | None) -> dict[str, Any] | None:
    """Read what the device says until the window opens again; its result when the job ended."""
    deadline = time.monotonic() + link.timeout
    before = (sender.sent, sender.limit)
    while time.monotonic() < deadline:
        line = link.read_line(0.05)
        if line is None:
            if (sender.sent, sender.limit) != before:
                return None
            continue
        deadline = time.monotonic() + link.timeout
        control = parse_control(line)
        if control is not None:
            sender.on_control(control)
            if sender.sent < min(sender.limit, sender.size):
                return None
            continue
        doc = _json(line)
        if doc is None:
            continue
        if "ok" in doc and doc.get("done") and (doc.get("job") or {}).get("id") == job:
            if doc.get("ok") is False:
                raise DeviceError(doc)
            return doc
        if "ok" not in doc and on_notice is not None:
            on_notice(doc)
    raise LinkLost(f"no answer from the device on {link.port} for {link.timeout:g} s")


def _json(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _reconnect(link: DeviceLink, within: float) -> None:
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            link.open()
            return
        except LinkLost as e:
            last = e
            time.sleep(0.5)
    raise LinkLost(f"the line did not come back within {within:g} s ({last})")
