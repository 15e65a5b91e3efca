"""The scripted twin of `agent.ranged.HttpRangeSource` for unit tests: in-memory
bytes behind the same resume and retry logic (`ResumableSource`), with one
scripted fault per connection attempt, and backoff waits recorded, not slept."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import DownloadConfig
from agent.errors import SourceError
from agent.pace import Pace
from agent.ranged import Attempt, ResourceChangedError, ResumableSource, Validators


class FaultKind(enum.Enum):
    RESET = "reset"  # serve `after` bytes, then the connection breaks
    TRUNCATE = "truncate"  # serve `after` bytes, then the body ends early
    STALL = "stall"  # the connection stalls at once (a transient error, no waiting)
    FLIP = "flip"  # the byte at absolute offset `at` arrives inverted
    STATUS = "status"  # answer with HTTP `status`
    IGNORE_RANGE = "ignore-range"  # answer 200 from byte 0
    CHANGE = "change"  # the resource is replaced by `data` (a new validator) from now on


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    after: int = 0
    at: int = 0
    status: int = 0
    data: bytes = b""


class _ScriptedAttempt:
    def __init__(self, source: ScriptedRangeSource, offset: int, end: int, fault: Fault | None) -> None:
        data, name = source.data, source.name
        self._data = data
        self._pos = offset
        self.end: int | None = end
        self._fault = fault
        self._name = name
        self._source = source
        self._served = 0

    def read(self, n: int, /) -> bytes:
        f = self._fault
        stop = self.end if self.end is not None else len(self._data)
        if f is not None and f.kind in (FaultKind.RESET, FaultKind.TRUNCATE):
            if self._served >= f.after:
                if f.kind is FaultKind.RESET:
                    raise SourceError(self._name, f"connection reset at byte {self._pos} (scripted)")
                return b""
            n = min(n, f.after - self._served)
        chunk = bytearray(self._data[self._pos : min(self._pos + n, stop)])
        if f is not None and f.kind is FaultKind.FLIP and self._pos <= f.at < self._pos + len(chunk):
            chunk[f.at - self._pos] ^= 0xFF
        self._pos += len(chunk)
        self._served += len(chunk)
        self._source.downloaded += len(chunk)
        return bytes(chunk)

    def close(self) -> None:
        pass


class ScriptedRangeSource(ResumableSource):
    """In-memory bytes behind the same resume/retry logic, with one scripted `Fault`
    (or None: a clean connection) per connection attempt. `requests` records each
    attempt's (offset, end); `slept` the backoff waits (nothing really sleeps)."""

    def __init__(
        self,
        data: bytes,
        script: Sequence[Fault | None] = (),
        limits: DownloadConfig | None = None,
        *,
        name: str = "scripted",
        etag: str | None = '"v1"',
        ranges: bool = True,
    ) -> None:
        self.slept: list[float] = []
        super().__init__(name, limits, sleep=self.slept.append)
        self.data = data
        self.etag = etag
        self.serves_ranges = ranges
        self.script = list(script)
        self.requests: list[tuple[int, int | None]] = []
        self._version = 1

    def _attempt(self, offset: int, end: int | None, pace: Pace) -> Attempt:
        self.requests.append((offset, end))
        fault = self.script.pop(0) if self.script else None
        if fault is not None and fault.kind is FaultKind.CHANGE:
            self.data = fault.data
            self._version += 1
            self.etag = f'"v{self._version}"' if self.etag else None
            fault = None
        if fault is not None and fault.kind is FaultKind.STALL:
            raise SourceError(self.name, f"stalled at byte {offset} (scripted)")
        if fault is not None and fault.kind is FaultKind.STATUS:
            transient = fault.status >= 500 or fault.status in (408, 429)
            raise SourceError(self.name, f"HTTP {fault.status}", transient=transient, status_code=fault.status)
        ranged = self.serves_ranges and not (fault is not None and fault.kind is FaultKind.IGNORE_RANGE)
        validators = Validators(self.etag)
        if ranged or (offset == 0 and end is None):
            if offset > len(self.data):
                raise ResourceChangedError(self.name, f"byte {offset} is no longer in it (HTTP 416)")
            self._pin(len(self.data), validators)
            stop = len(self.data) if end is None else min(end, len(self.data))
            self.ranges = ranged if (offset or end is not None) else self.ranges
            return _ScriptedAttempt(self, offset, stop, fault)
        self._pin(len(self.data), validators)
        self.ranges = False
        whole = _ScriptedAttempt(self, 0, len(self.data), fault)
        return _Skipping(whole, offset, end)


class _Skipping:
    """A whole-resource answer read from byte 0, the bytes before `offset` dropped."""

    def __init__(self, inner: _ScriptedAttempt, offset: int, end: int | None) -> None:
        self._inner = inner
        self._skip = offset
        self.end = inner.end

    def read(self, n: int, /) -> bytes:
        while self._skip:
            data = self._inner.read(min(self._skip, 1 << 20))
            if not data:
                return b""
            self._skip -= len(data)
        return self._inner.read(n)

    def close(self) -> None:
        self._inner.close()
