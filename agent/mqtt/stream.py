"""A bundle streamed over MQTT in chunks, with flow control: the `BundleSource` of an
`install-stream` job, for devices that reach only the broker (docs/mqtt.md).

Wire form (topics in agent.mqtt.topics):

    .../jobs/<job>/chunks  operator -> device, QoS 1: an 8-byte big-endian offset, then
                           the chunk's raw bytes. Every chunk but the last is exactly
                           `chunk_size` bytes; offsets are multiples of `chunk_size`.
    .../jobs/<job>/credit  device -> operator, QoS 1: `{"credit": N, "next": OFFSET}`:
                           the device wants the chunk at OFFSET next and may be sent the
                           chunks below OFFSET + N * chunk_size (never more than `size`).
                           `"resend": true` when no chunk came for a while (the operator
                           sends again from OFFSET); `"closed": true` when the device stops
                           reading (done, or it gave up): the operator stops sending.

The device grants a window of at most `WINDOW_BYTES` (and at most `WINDOW_CHUNKS`
chunks) beyond what the installer has read, and grants more as the installer reads,
so what it holds in memory is bounded by the window by construction. A chunk below the
next wanted offset (a redelivery) is ignored; one ahead of it waits in the window for
the gap to fill; one beyond the granted window, misaligned, of the wrong length or past
`size` ends the transfer with a specific error (the sender ignores the protocol). The
SHA-256 of the whole stream is checked against the job's `sha256` before its last
bytes are handed on. The `[download]` stall limit and deadline apply (agent.pace): no
chunk for the stall time is a transient `SourceError`.

Owns the reassembly and the credit; not the connection (link.py), not the job (frontend.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.config import DownloadConfig
from agent.errors import SourceError
from agent.mqtt.schema import CHUNK_HEADER as HEADER
from agent.mqtt.schema import credit_message
from agent.pace import Pace
from agent.sources import BundleSource, RawStream

log = logging.getLogger(__name__)

WINDOW_BYTES = 2 << 20  # at most this many bundle bytes granted beyond what the installer read
WINDOW_CHUNKS = 8
RESEND_AFTER = 5.0  # seconds without a chunk before the credit is sent again (with "resend")
SUBSCRIBE_TIMEOUT = 15.0

Handler = Callable[[str, bytes], object]


class ChunkLink(Protocol):
    """What the stream needs of the MQTT link (agent.mqtt.link.Link)."""

    def add_route(self, topic: str, handler: Handler, timeout: float) -> bool: ...
    def remove_route(self, topic: str) -> None: ...
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None: ...


def window_chunks(chunk_size: int) -> int:
    return max(1, min(WINDOW_CHUNKS, WINDOW_BYTES // chunk_size))


class Reassembly:
    """The in-order view of the chunks (no threads, no IO): `accept` a chunk payload,
    `take` the contiguous bytes, ask `credit` what to grant. Errors are `SourceError`s."""

    def __init__(self, name: str, size: int, sha256: str, chunk_size: int, window: int | None = None) -> None:
        self.name = name
        self.size = size
        self.sha256 = sha256
        self.chunk_size = chunk_size
        self.window = window or window_chunks(chunk_size)
        self.expected = 0  # the next offset wanted (everything below it is in `ready` or read)
        self.read_pos = 0  # bytes handed on
        self.granted = 0  # the sender may send chunks below this offset
        self._pending: dict[int, bytes] = {}
        self._ready = bytearray()
        self._hash = hashlib.sha256()
        self.duplicates = 0
        self.peak = 0  # the most bytes held at once (ready + pending)

    @property
    def held(self) -> int:
        return len(self._ready) + sum(len(d) for d in self._pending.values())

    @property
    def complete(self) -> bool:
        return self.expected >= self.size

    def accept(self, payload: bytes) -> bool:
        """Take one chunk message; False for a duplicate (ignored)."""
        if len(payload) < HEADER.size:
            raise self._refuse(f"a chunk message of {len(payload)} bytes has no {HEADER.size}-byte offset header")
        (offset,) = HEADER.unpack_from(payload)
        data = payload[HEADER.size :]
        if offset % self.chunk_size:
            raise self._refuse(f"chunk offset {offset} is not a multiple of the chunk size {self.chunk_size}")
        if offset >= self.size:
            raise self._refuse(f"chunk offset {offset} is at or past the bundle's size of {self.size} bytes")
        want = min(self.chunk_size, self.size - offset)
        if len(data) != want:
            raise self._refuse(f"the chunk at offset {offset} has {len(data)} bytes, not {want}")
        if offset < self.expected or offset in self._pending:
            self.duplicates += 1
            return False
        if offset >= self.granted:
            raise self._refuse(f"the chunk at offset {offset} is beyond the granted window (below {self.granted}); "
                               "the sender ignores flow control")
        self._pending[offset] = data
        while self.expected in self._pending:
            chunk = self._pending.pop(self.expected)
            self._hash.update(chunk)
            self.expected += len(chunk)
            if self.complete and self._hash.hexdigest() != self.sha256:
                self._ready.clear()
                self._pending.clear()
                raise SourceError(self.name, f"the streamed {self.size} bytes have SHA-256 {self._hash.hexdigest()}, "
                                  f"not the job's {self.sha256}", transient=False)
            self._ready += chunk
        self.peak = max(self.peak, self.held)
        return True

    def take(self, n: int) -> bytes:
        data = bytes(self._ready[:n])
        del self._ready[:n]
        self.read_pos += len(data)
        return data

    @property
    def available(self) -> int:
        return len(self._ready)

    def credit(self, *, force: bool = False) -> dict[str, Any] | None:
        """The credit to send now (after the window moved far enough, or `force`d), else None."""
        base = self.read_pos - self.read_pos % self.chunk_size
        limit = min(self.size, base + self.window * self.chunk_size)
        step = max(self.chunk_size, self.window * self.chunk_size // 2)
        due = limit > self.granted and (limit - self.granted >= step or limit == self.size or self.granted == 0)
        if not (due or force):
            return None
        self.granted = max(self.granted, limit)
        left = max(0, self.granted - self.expected)
        return {"credit": -(-left // self.chunk_size), "next": self.expected}

    def _refuse(self, what: str) -> SourceError:
        return SourceError(self.name, what, transient=False)


class MqttStreamSource(BundleSource):
    """The chunks of one install-stream job. `open()` subscribes to the job's chunk topic
    and grants the first window; the stream's `close()` says "closed" and unsubscribes."""

    def __init__(self, link: ChunkLink, chunks_topic: str, credit_topic: str, *, size: int, sha256: str,
                 chunk_size: int, limits: DownloadConfig | None = None, resend_after: float = RESEND_AFTER) -> None:
        super().__init__(f"mqtt:{chunks_topic}", limits)
        self.link = link
        self.chunks_topic = chunks_topic
        self.credit_topic = credit_topic
        self.size, self.sha256, self.chunk_size = size, sha256, chunk_size
        self.resend_after = resend_after
        self.stream: ChunkStream | None = None

    def _open(self, pace: Pace) -> tuple[RawStream, int | None]:
        if self.size > self.cap:
            raise SourceError(self.name, f"{self.size} bytes is more than the cap of {self.cap}", transient=False)
        stream = ChunkStream(self, pace)
        if not self.link.add_route(self.chunks_topic, stream.feed, SUBSCRIBE_TIMEOUT):
            self.link.remove_route(self.chunks_topic)
            raise SourceError(self.name, f"could not subscribe to the chunk topic within {SUBSCRIBE_TIMEOUT:g} s")
        self.stream = stream
        stream.grant()
        return stream, self.size


class ChunkStream:
    """The raw stream the reader reads: chunks arrive on paho's thread (`feed`), the
    installer's thread reads (`read`), a condition joins them."""

    def __init__(self, source: MqttStreamSource, pace: Pace) -> None:
        self.source = source
        self.pace = pace
        self.state = Reassembly(source.name, source.size, source.sha256, source.chunk_size)
        self._cond = threading.Condition()
        self._failure: SourceError | None = None
        self._closed = False
        self._last_chunk = time.monotonic()

    def feed(self, topic: str, payload: bytes) -> None:
        with self._cond:
            if self._failure is not None or self._closed:
                return
            try:
                self.state.accept(payload)
            except SourceError as e:
                log.error("install stream: %s", e)
                self._failure = e
            self._last_chunk = time.monotonic()
            self._cond.notify_all()

    def read(self, n: int, /) -> bytes:
        while True:
            resend = None
            with self._cond:
                if self._failure is not None:
                    raise self._failure
                if self.state.available:
                    data = self.state.take(n)
                    credit = self.state.credit()
                    break
                if self.state.read_pos >= self.state.size:
                    return b""
                budget = self.pace.budget()  # raises once the stall limit or deadline passed
                self._cond.wait(min(budget, self.source.resend_after))
                self.pace.waited()
                if not self.state.available and time.monotonic() - self._last_chunk >= self.source.resend_after:
                    self._last_chunk = time.monotonic()
                    resend = self.state.credit(force=True)
            self._send(resend, resend=True)  # never publish holding the lock paho's thread needs
        self.pace.delivered(len(data))
        self._send(credit)
        return data

    def grant(self) -> None:
        with self._cond:
            credit = self.state.credit(force=True)
        self._send(credit)

    def _send(self, credit: dict[str, Any] | None, **extra: bool) -> None:
        if credit is None:
            return
        credit.update(extra)
        if self.source.link.publish(self.source.credit_topic, credit_message(credit), qos=1) is None:
            log.warning("mqtt: the client queue is full; a credit is sent again when no chunk comes")

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            done = {"credit": 0, "next": self.state.expected}
            self._cond.notify_all()
        self._send(done, closed=True)
        self.source.link.remove_route(self.source.chunks_topic)
