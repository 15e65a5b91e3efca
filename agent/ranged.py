"""Ranged, resumable reads of one remote resource (a bundle, a registry blob).

`RangeSource` is the small interface the install stream, adaptive (delta)
download and registry fetches code against:

    name        what errors name (the URL)
    total()     size of the whole resource
    validator() strong ETag, else Last-Modified, pinned at first contact
    fetch(offset, length) -> RawStream   exactly those bytes

Both implementations share `ResumableSource`, which owns what every fetch does
whatever the transport: a stream that breaks (reset, truncated body, stall,
5xx, 408, 429) reconnects from the byte it reached, after an exponential
backoff with jitter (tenacity), at most `DownloadConfig.retries` times in a row
without a new byte arriving; an attempt that brought bytes starts the count
afresh. A 429 or 503 with `Retry-After` (delta seconds or an HTTP-date) waits
what the server asks, capped by `retry_backoff_max`, instead of the backoff.
The wait is on the source's `cancel` Event (a job's cancel sets it): a cancel
during a backoff ends it at once with `CanceledError`. Errors that retrying
cannot fix are raised at once: 4xx other than 408/429, the byte cap, the
overall deadline, TLS trust and client-certificate refusals, and
`ResourceChangedError` (the validator or the size changed since first
contact). Exhausting the policy raises the last error with "gave up after N
attempts". Counters: `downloaded` (body bytes that crossed the network,
skipped and refetched ones included), `connections`, `ranges` (whether the
server honours Range).

`HttpRangeSource` is the real one (`agent.httpclient`: Range + If-Range with the
pinned validator; a server that ignores Range and answers 200 is read from byte
0 and the bytes before the offset skipped). `agent.ranged_scripted.ScriptedRangeSource` is its twin
for unit tests: bytes in memory and a script of faults, one per connection
attempt, no sockets and no sleeping.

Owns no bundle knowledge; `agent.sources` wraps a stream for the reader.
"""

from __future__ import annotations

import logging
import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from agent.config import DownloadConfig
from agent.errors import CanceledError, SourceError
from agent.httpclient import HttpClient, HttpResponse
from agent.pace import Pace, PaceLimits
from ota_common.retryafter import parse_retry_after
from ota_common.text import clean

if TYPE_CHECKING:
    import tenacity  # imported where it retries: a local install never does (start-up time)

log = logging.getLogger(__name__)

Sleep = Callable[[float], None]
T = TypeVar("T")


class RawStream(Protocol):
    def read(self, n: int, /) -> bytes: ...
    def close(self) -> None: ...


class RangeSource(Protocol):
    name: str

    def total(self) -> int: ...
    def validator(self) -> str | None: ...
    def fetch(self, offset: int, length: int) -> RawStream: ...


class RetryAfterError(SourceError):
    """A 429 or 503 whose `Retry-After` says how many seconds to wait before trying again."""

    def __init__(self, source: str, message: str, retry_after: float, status_code: int) -> None:
        super().__init__(source, message, transient=True, status_code=status_code)
        self.retry_after = retry_after


class ResourceChangedError(SourceError):
    """The resource is not the one first contacted (validator or size differ): never retried."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(source, f"the resource changed during the download: {message}", transient=False)


@dataclass(frozen=True, slots=True)
class Validators:
    """What identifies one version of the resource: a strong ETag and/or Last-Modified."""

    etag: str | None = None
    last_modified: str | None = None

    @property
    def best(self) -> str | None:
        return self.etag or self.last_modified

    def differs(self, other: Validators) -> str | None:
        """Why `other` is another version (only validators both carry are compared)."""
        if self.etag and other.etag and self.etag != other.etag:
            return f"ETag {clean(self.etag, 60)} became {clean(other.etag, 60)}"
        if self.last_modified and other.last_modified and self.last_modified != other.last_modified:
            return f"Last-Modified {clean(self.last_modified, 40)} became {clean(other.last_modified, 40)}"
        return None


class Attempt(Protocol):
    """One connection's body, positioned at the offset asked for. `end` is the
    exclusive end of what it serves (None: until it closes)."""

    end: int | None

    def read(self, n: int, /) -> bytes: ...
    def close(self) -> None: ...


class ResumableSource(ABC):
    """The resume/retry machinery shared by the real source and its scripted twin."""

    def __init__(self, name: str, limits: DownloadConfig | None = None, *, sleep: Sleep | None = None) -> None:
        self.name = name
        self.limits = limits or DownloadConfig()
        self.cap = self.limits.max_bytes
        self._sleep = sleep  # None: wait on `cancel`
        self.cancel = threading.Event()  # set (or replaced by a job's) to end a backoff wait at once
        self._total: int | None = None
        self._pinned: Validators | None = None  # None until first contact
        self.ranges: bool | None = None  # whether the server honours Range (None: not seen yet)
        self.downloaded = 0
        self.connections = 0
        self.retries = 0

    # --- the interface -----------------------------------------------------

    def total(self) -> int:
        if self._pinned is None:
            with self.fetch(0, 1) as first:  # first contact: one byte pins the size and the validator
                first.open()
        if self._total is None:
            raise SourceError(self.name, "the server does not say how large the resource is", transient=False)
        return self._total

    def validator(self) -> str | None:
        if self._pinned is None:
            self.total()
        return self._pinned.best if self._pinned else None

    def fetch(self, offset: int, length: int) -> RangeStream:
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range {offset}+{length}")
        if self._total is not None and offset + length > self._total:
            raise SourceError(self.name, f"bytes {offset}+{length} lie past its end ({self._total})", transient=False)
        return RangeStream(self, offset, offset + length, self._pace())

    def stream(self, offset: int = 0, pace: Pace | None = None) -> RangeStream:
        """From `offset` to the end of the resource (its size learnt at first contact)."""
        return RangeStream(self, offset, self._total, pace or self._pace())

    @property
    def known_total(self) -> int | None:
        return self._total

    # --- for subclasses ----------------------------------------------------

    @abstractmethod
    def _attempt(self, offset: int, end: int | None, pace: Pace) -> Attempt:
        """Open one connection for bytes offset..end (exclusive; None: to the end),
        validated against the pinned size and validator (`_pin`)."""

    def _pin(self, total: int | None, found: Validators) -> None:
        """Pin the size and validators at first contact; later, refuse another version."""
        if total is not None and total > self.cap:
            raise SourceError(self.name, f"{total} bytes is more than the cap of {self.cap}", transient=False)
        if self._pinned is None:
            self._pinned = found
            self._total = total
            return
        why = self._pinned.differs(found)
        if why is None and total is not None and self._total is not None and total != self._total:
            why = f"its size {self._total} became {total}"
        if why is not None:
            raise ResourceChangedError(self.name, why)
        if self._total is None:
            self._total = total

    def _pace(self) -> Pace:
        lim = self.limits
        return Pace(self.name, PaceLimits(lim.stall_bytes, lim.stall_seconds, lim.deadline))

    def _retrying(self, pace: Pace) -> tenacity.Retrying:
        return self._policy().retrying(pace)

    def _gave_up(self, error: tenacity.RetryError) -> SourceError:
        return self._policy().gave_up(error)

    def _policy(self) -> RetryPolicy:
        def counted() -> None:
            self.retries += 1

        return RetryPolicy(self.name, self.limits, self.cancel, sleep=self._sleep, on_retry=counted)


class RetryPolicy:
    """`[download]`'s retry policy for one resource, also for requests outside a ranged
    read (a registry's manifest and token): transient SourceErrors retried at most
    `retries` times with exponential backoff and jitter, or the server's Retry-After
    capped by `retry_backoff_max`; the wait is on `cancel`, so a cancel ends it at once."""

    def __init__(self, name: str, limits: DownloadConfig, cancel: threading.Event, *, sleep: Sleep | None = None,
                 on_retry: Callable[[], None] | None = None) -> None:
        self.name = name
        self.limits = limits
        self.cancel = cancel
        self._sleep = sleep  # None: wait on `cancel`
        self._on_retry = on_retry

    def call(self, fn: Callable[[], T], pace: Pace) -> T:
        """`fn()` under the policy; exhausting it raises the last error, "gave up after N attempts"."""
        import tenacity  # noqa: PLC0415

        try:
            for attempt in self.retrying(pace):
                with attempt:
                    return fn()
        except tenacity.RetryError as e:
            raise self.gave_up(e) from None
        raise AssertionError("tenacity ended without a result")  # pragma: no cover

    def wait(self, seconds: float) -> None:
        """The backoff between attempts: an Event wait, so a cancel ends it at once."""
        if self._sleep is not None:
            self._sleep(seconds)
            canceled = self.cancel.is_set()
        else:
            canceled = self.cancel.wait(seconds)
        if canceled:
            raise CanceledError(f"{self.name}: canceled while waiting to retry")

    def retrying(self, pace: Pace) -> tenacity.Retrying:
        import tenacity  # noqa: PLC0415

        lim = self.limits
        # base, 2 x base, 4 x base ... up to the max, plus up to one base of jitter
        backoff = tenacity.wait_exponential(multiplier=lim.retry_backoff, max=lim.retry_backoff_max) + \
            tenacity.wait_random(0, lim.retry_backoff)

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, RetryAfterError):  # what the server asked for, within our own limit
                return min(error.retry_after, lim.retry_backoff_max)
            return float(backoff(state))

        def retryable(e: BaseException) -> bool:
            return isinstance(e, SourceError) and e.transient and not pace.expired()

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if self._on_retry is not None:
                self._on_retry()
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning("%s; retrying in %.1f s (attempt %d of %d)", error, wait, state.attempt_number + 1,
                        lim.retries + 1)

        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(lim.retries + 1),
            wait=wait,
            retry=tenacity.retry_if_exception(retryable),
            sleep=self.wait,
            before_sleep=before_sleep,
            reraise=False,
        )

    def gave_up(self, error: tenacity.RetryError) -> SourceError:
        last = error.last_attempt.exception()
        attempts = error.last_attempt.attempt_number
        if not isinstance(last, SourceError):  # cannot happen: only SourceErrors are retried
            return SourceError(self.name, f"gave up after {attempts} attempts")
        if attempts == 1:
            return last
        detail = str(last).removeprefix(f"{last.source}: ")
        return SourceError(
            self.name, f"{detail} (gave up after {attempts} attempts)", transient=True, status_code=last.status_code
        )


class RangeStream:
    """Bytes `offset..end` of a `ResumableSource` (`end` None: to the end); `read(n)`
    resumes across broken connections from the byte it reached."""

    def __init__(self, source: ResumableSource, offset: int, end: int | None, pace: Pace) -> None:
        self._source = source
        self.position = offset
        self.end = end
        self._pace = pace
        self._conn: Attempt | None = None

    def read(self, n: int, /) -> bytes:
        if self.end is not None and self.position >= self.end:
            self._finish()
            return b""
        if n <= 0:
            return b""
        import tenacity  # noqa: PLC0415

        try:
            for attempt in self._source._retrying(self._pace):
                with attempt:
                    return self._read_once(n)
        except tenacity.RetryError as e:
            raise self._source._gave_up(e) from None
        raise AssertionError("tenacity ended without a result")  # pragma: no cover

    def _finish(self) -> None:
        """At the end: a connection serving exactly up to here reads once more, so its
        framing can check that the body really ends here (a body longer than its
        Content-Length is refused, as a plain GET would)."""
        conn = self._conn
        if conn is None or conn.end != self.end:
            return
        self._conn = None
        try:
            extra = conn.read(1)
        finally:
            conn.close()
        if extra:
            raise SourceError(self._source.name, f"more than the {self.end} bytes announced")

    def open(self) -> None:
        """Make the first contact now (with retries), so that a refusal shows before
        the first read."""
        if self._conn is not None:
            return
        import tenacity  # noqa: PLC0415

        try:
            for attempt in self._source._retrying(self._pace):
                with attempt:
                    self._connect()
        except tenacity.RetryError as e:
            raise self._source._gave_up(e) from None

    def _connect(self) -> Attempt:
        if self._conn is None:
            self._pace.reconnected()
            self._source.connections += 1
            self._conn = self._source._attempt(self.position, self.end, self._pace)
            if self.end is None:
                self.end = self._source.known_total
        return self._conn

    def _read_once(self, n: int) -> bytes:
        if self._pace.expired():
            raise SourceError(self._source.name, f"deadline of {self._source.limits.deadline:g} s passed "
                              f"after {self._pace.received} bytes", transient=False)
        conn = self._connect()
        want = n if self.end is None else min(n, self.end - self.position)
        try:
            data = conn.read(want)
        except OSError as e:
            self.close()
            reason = clean(e.strerror or e, 80)
            raise SourceError(self._source.name, f"read failed at byte {self.position}: {reason}") from None
        except BaseException:
            self.close()
            raise
        if len(data) > want:
            self.close()
            raise SourceError(self._source.name, f"connection sent {len(data)} bytes, {want} were asked for")
        if data:
            self.position += len(data)
            return data
        served_to = conn.end
        self.close()
        if self.end is None:  # a body delimited by the connection closing: this is its end
            self.end = self.position
            return b""
        if self.position >= self.end:
            return b""
        if served_to is not None and self.position >= served_to:
            return self._read_once(n)  # the server sent a shorter range than asked: ask for the rest
        raise SourceError(self._source.name, f"connection ended at byte {self.position} of {self.end}")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> RangeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the real one: HTTP(S) ---------------------------------------------------------


def validators_of(response: HttpResponse) -> Validators:
    etag = (response.headers.get("etag") or "").strip()
    last_modified = (response.headers.get("last-modified") or "").strip()
    strong = etag if etag and not etag.startswith("W/") and len(etag) <= 256 else None
    return Validators(strong, last_modified if 0 < len(last_modified) <= 64 else None)


def status_error(name: str, response: HttpResponse, original: str) -> SourceError:
    """The error for a status that is neither 200 nor 206: 408, 429 and 5xx may pass."""
    code = response.status
    after = f" (after redirect to {clean(response.url, 200)})" if response.url != original else ""
    if code >= 400:
        transient = code >= 500 or code in (408, 429)
        message = f"HTTP {code} {response.reason}".rstrip() + after
        retry_after = parse_retry_after(response.headers.get("retry-after")) if code in (429, 503) else None
        if retry_after is not None:
            return RetryAfterError(name, f"{message} (Retry-After {retry_after:.0f} s)", retry_after, code)
        return SourceError(name, message, transient=transient, status_code=code)
    message = f"unexpected HTTP {code} {response.reason}".rstrip() + after
    return SourceError(name, message, transient=False, status_code=code)


class _HttpAttempt:
    def __init__(self, source: HttpRangeSource, response: HttpResponse, end: int | None, skip: int) -> None:
        self._source = source
        self._response = response
        self.end = end
        self._skip = skip

    def read(self, n: int, /) -> bytes:
        while self._skip:  # a server that ignored Range: the bytes before the offset go by
            data = self._response.read(min(self._skip, 1 << 20))
            if not data:
                return b""
            self._source.downloaded += len(data)
            self._skip -= len(data)
        data = self._response.read(n)
        self._source.downloaded += len(data)
        return data

    def close(self) -> None:
        self._response.close()


class HttpRangeSource(ResumableSource):
    """One http(s) URL, read in ranges through `agent.httpclient`."""

    def __init__(
        self,
        url: str,
        limits: DownloadConfig | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        client: HttpClient | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        super().__init__(url, limits, sleep=sleep)
        self.url = url
        lim = self.limits
        self.client = client or HttpClient(
            tls=tls, connect_timeout=lim.connect_timeout, headers=lim.headers, proxy=lim.proxy, no_proxy=lim.no_proxy
        )
        self._warned = False

    def _attempt(self, offset: int, end: int | None, pace: Pace) -> Attempt:
        ranged = offset > 0 or end is not None
        if_range = self._pinned.best if ranged and self._pinned else None
        response = self.client.get(
            self.url,
            pace,
            cap=self.cap,
            range_start=offset if ranged else None,
            range_end=end - 1 if ranged and end is not None else None,
            if_range=if_range,
        )
        try:
            return self._accept(response, offset, end, ranged)
        except BaseException:
            response.close()
            raise

    def _accept(self, response: HttpResponse, offset: int, end: int | None, ranged: bool) -> Attempt:
        found = validators_of(response)
        if response.status == 206 and ranged:
            if response.range_start is None or response.range_end is None:
                raise SourceError(self.name, "HTTP 206 without a valid Content-Range")
            served = response.range_end + 1
            if response.range_start != offset or (end is not None and served > end) or served <= offset:
                text = f"{response.range_start}-{response.range_end}"
                raise SourceError(self.name, f"asked for bytes from {offset}, the server sent {text}")
            if response.length is not None and response.length != served - offset:
                raise SourceError(self.name, f"Content-Length {response.length} does not match its Content-Range")
            self._pin(response.total, found)
            self.ranges = True
            return _HttpAttempt(self, response, served, 0)
        if response.status == 200:
            self._pin(response.length, found)
            if ranged:
                self.ranges = False
                if not self._warned:
                    self._warned = True
                    log.warning("%s: the server ignores Range; reading from byte 0 to resume at %d", self.name, offset)
            return _HttpAttempt(self, response, self._total, offset)
        if response.status == 416:
            total = clean(response.headers.get("content-range") or "", 60)
            raise ResourceChangedError(self.name, f"byte {offset} is no longer in it (HTTP 416, {total!r})")
        raise status_error(self.name, response, self.url)
