"""Stall and deadline accounting for one transfer (curl's `--speed-limit`,
`--speed-time` and `--max-time`), shared by every bundle source.

A source asks `budget()` how long its next wait for the peer may last, waits at
most that long (poll, a socket timeout), calls `waited()`, and reports the useful
bytes it hands on with `delivered(n)` (protocol framing does not count, so a
peer cannot keep a transfer alive with headers, chunk extensions or trailers).
`budget()` raises a transient `SourceError` once the peer delivered fewer than
`stall_bytes` in `stall_seconds` of waiting, or the optional overall deadline
has passed.

Only the time spent *waiting for the peer* counts towards a stall window: the
consumer may take as long as it needs between reads (writing a large ZERO
extent, hashing) without the peer being blamed for it. The deadline is wall
clock from `Pace` creation, consumer time included; 0 means none. Owns no IO.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import SourceError

Clock = Callable[[], float]
MIN_WAIT = 0.01  # a wait shorter than this is rounded up (poll and socket timeouts have coarse granularity)


@dataclass(frozen=True, slots=True)
class PaceLimits:
    stall_bytes: int = 1024  # at least this many bytes ...
    stall_seconds: float = 60.0  # ... in every window of this many seconds spent waiting
    deadline: float = 0.0  # seconds for the whole transfer; 0 = none


class Pace:
    def __init__(self, name: str, limits: PaceLimits, clock: Clock = time.monotonic) -> None:
        self.name = name
        self.limits = limits
        self._clock = clock
        self._start = clock()
        self._wait_start: float | None = None
        self._window_bytes = 0
        self._window_waited = 0.0
        self.received = 0  # useful bytes delivered so far
        self.phase = ""  # what the transfer is waiting for, for the error text ("response headers")

    def budget(self) -> float:
        """Seconds the next wait for the peer may last (> 0). Raises when the current
        window was spent waiting without `stall_bytes` delivered, or past the deadline."""
        now = self._clock()
        lim = self.limits
        if self._window_waited >= lim.stall_seconds:
            raise self._error(f"stalled: fewer than {lim.stall_bytes} bytes in {lim.stall_seconds:g} s")
        left = lim.stall_seconds - self._window_waited
        if lim.deadline:
            to_deadline = self._start + lim.deadline - now
            if to_deadline <= 0:
                raise self._error(f"deadline of {lim.deadline:g} s passed")
            left = min(left, to_deadline)
        self._wait_start = now
        return max(left, MIN_WAIT)

    def remaining(self) -> float:
        """Seconds left before the deadline (infinite without one). Raises when it passed."""
        if not self.limits.deadline:
            return math.inf
        left = self._start + self.limits.deadline - self._clock()
        if left <= 0:
            raise self._error(f"deadline of {self.limits.deadline:g} s passed")
        return left

    def waited(self) -> None:
        """A wait that `budget()` allowed is over (data came, it timed out, or it was interrupted)."""
        if self._wait_start is not None:
            self._window_waited += self._clock() - self._wait_start
            self._wait_start = None

    def reconnected(self) -> None:
        """A new connection of the same transfer (a resume): its stall window starts
        afresh; the bytes received and the deadline carry on."""
        self._wait_start = None
        self._window_bytes = 0
        self._window_waited = 0.0
        self.phase = ""

    def expired(self) -> bool:
        """Whether the overall deadline (if any) has passed."""
        return bool(self.limits.deadline) and self._clock() >= self._start + self.limits.deadline

    def delivered(self, n: int) -> None:
        """`n` useful bytes (bundle bytes, not protocol framing) reached the consumer."""
        self.received += n
        self._window_bytes += n
        if self._window_bytes >= self.limits.stall_bytes:
            self._window_bytes = 0
            self._window_waited = 0.0

    def _error(self, what: str) -> SourceError:
        where = f" ({self.phase})" if self.phase else ""
        return SourceError(self.name, f"{what} after {self.received} bytes{where}", transient=True)
