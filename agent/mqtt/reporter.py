"""Delivering the durable outbox over MQTT: each record published at QoS 1, in
`seq` order, and acknowledged to the outbox (`ack(seq)`) only once the
broker's PUBACK for it arrived.

The outbox is the application's (a durable, ordered store); this module sees
it through the small `Outbox` protocol and turns a record into a message with
a `Route` the application supplies (topic, payload, retain). The reporter runs
its own thread; paho's callbacks only put events on its queue, so no lock is
ever held across a call into paho and a PUBACK can never overtake the
bookkeeping of its own publish.

- At most `window` records are handed to paho at a time (the in-flight window).
- Acks reach the outbox in `seq` order: a PUBACK for a later record waits
  until every earlier one is acknowledged too, so the outbox may treat `ack`
  as "everything up to here" or as "this one" alike.
- Within one process paho keeps unacknowledged messages and resends them (with
  DUP) after a network reconnect; across a restart the outbox still holds
  them and they are published again. Delivery is at least once: a duplicate
  carries the same record id.
- A PUBACK with an MQTT 5 failure reason code (quota exceeded, not
  authorized, ...) means "not delivered": the record stays pending and is
  published again after `retry_delay` seconds.
- A record that can never be published (its route raises, or the topic or
  size is one MQTT refuses) is logged as an error and acknowledged, so one
  poison record cannot block every later report; `undeliverable` counts them.

Owns the in-flight bookkeeping; not the outbox's storage, not the connection.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ota_common.text import clean

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 16
DEFAULT_POLL = 5.0
DEFAULT_RETRY = 5.0


class Record(Protocol):
    """What the reporter needs of an outbox record: its position and its stable id."""

    @property
    def seq(self) -> int: ...

    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=Record)
R_co = TypeVar("R_co", bound=Record, covariant=True)


class Outbox(Protocol[R_co]):
    """The durable outbox as the reporter uses it: the unacknowledged records in `seq`
    order, and `ack(seq)` once one is delivered."""

    def pending(self) -> Sequence[R_co]: ...

    def ack(self, seq: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Message:
    """One record as MQTT sees it."""

    topic: str
    payload: bytes
    retain: bool = False


Route = Callable[[R], Message]


class LinkListener(Protocol):
    """What a link tells its listeners (from its network thread)."""

    def link_up(self, session_present: bool) -> None: ...

    def link_down(self) -> None: ...

    def published(self, mid: int, ok: bool, reason: str) -> None: ...


class Publisher(Protocol):
    """The link as the reporter uses it (`agent.mqtt.link.Link` is one)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None: ...

    def add_listener(self, listener: LinkListener) -> None: ...


class Reporter(Generic[R]):
    def __init__(
        self,
        link: Publisher,
        outbox: Outbox[R],
        route: Route[R],
        *,
        window: int = DEFAULT_WINDOW,
        poll: float = DEFAULT_POLL,
        retry_delay: float = DEFAULT_RETRY,
    ) -> None:
        if window < 1:
            raise ValueError("the in-flight window must be at least 1")
        self.link = link
        self.outbox = outbox
        self.route = route
        self.window = window
        self.poll = poll
        self.retry_delay = retry_delay
        self.undeliverable = 0
        self._events: queue.SimpleQueue[tuple[str, int, bool, str]] = queue.SimpleQueue()
        self._inflight: dict[int, int | None] = {}  # seq -> mid (None: waiting for a retry)
        self._by_mid: dict[int, int] = {}  # mid -> seq
        self._delivered: set[int] = set()  # seqs PUBACKed but waiting for an earlier one
        self._retry_at = 0.0
        self._lock = threading.Lock()  # guards only the counters read by in_flight()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        link.add_listener(self)

    # ---- link listener (paho's network thread: enqueue only) -----------------------------------

    def link_up(self, session_present: bool) -> None:
        self._events.put(("up", 0, session_present, ""))

    def link_down(self) -> None:
        self._events.put(("down", 0, False, ""))

    def published(self, mid: int, ok: bool, reason: str) -> None:
        self._events.put(("puback", mid, ok, reason))

    # ---- the application's side -----------------------------------------------------------------

    def wake(self) -> None:
        """Tell the reporter the outbox has something new (otherwise it looks every `poll` seconds)."""
        self._events.put(("wake", 0, False, ""))

    def in_flight(self) -> int:
        """Records handed to the client and not yet acknowledged."""
        with self._lock:
            return len(self._inflight)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="mqtt-reporter", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop publishing; records not yet acknowledged stay in the outbox."""
        self._stopping.set()
        self._events.put(("stop", 0, False, ""))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- the reporter thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = [self._events.get(timeout=self.poll)]
            except queue.Empty:
                batch = []
            while True:  # take every event already queued, then ack and fill once
                try:
                    batch.append(self._events.get_nowait())
                except queue.Empty:
                    break
            try:
                for kind, mid, ok, reason in batch:
                    if kind == "stop":
                        return
                    if kind == "puback":
                        self._on_puback(mid, ok, reason)
                self._ack_in_order()
                self._fill()
            except Exception:
                log.exception("mqtt reporter: unexpected error; carrying on")

    def _on_puback(self, mid: int, ok: bool, reason: str) -> None:
        seq = self._by_mid.pop(mid, None)
        if seq is None:
            return  # not ours (a job answer or the presence message)
        if ok:
            self._delivered.add(seq)
            return
        log.warning("mqtt: broker refused report %d (%s); retrying in %.0f s", seq, clean(reason, 120),
                    self.retry_delay)
        with self._lock:
            self._inflight[seq] = None
        self._retry_at = time.monotonic() + self.retry_delay

    def _ack_in_order(self) -> None:
        while self._inflight:
            first = min(self._inflight)
            if first not in self._delivered:
                return
            self.outbox.ack(first)
            self._delivered.discard(first)
            with self._lock:
                del self._inflight[first]

    def _fill(self) -> None:
        full = len(self._inflight) >= self.window and None not in self._inflight.values()
        if full or not self.link.connected:
            return
        retry_due = time.monotonic() >= self._retry_at
        for record in self.outbox.pending():
            seq = record.seq
            if seq in self._delivered:
                continue
            if seq in self._inflight:
                if self._inflight[seq] is not None or not retry_due:
                    continue
            elif len(self._inflight) >= self.window:
                return
            if not self._publish(record):
                return

    def _publish(self, record: R) -> bool:
        """Hand one record to the client; False when the client cannot take more right now."""
        seq = record.seq
        try:
            message = self.route(record)
            mid = self.link.publish(message.topic, message.payload, qos=1, retain=message.retain)
        except Exception as e:
            self.undeliverable += 1
            log.error("mqtt: report %d (id %s) can never be published (%s); dropping it from the outbox",
                      seq, clean(record.id, 80), clean(e))
            self._delivered.add(seq)
            with self._lock:
                self._inflight[seq] = None
            self._ack_in_order()
            return True
        if mid is None:
            return False  # the client's queue is full; the next PUBACK or poll tries again
        with self._lock:
            self._inflight[seq] = mid
        self._by_mid[mid] = seq
        return True
