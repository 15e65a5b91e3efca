"""Bundle sources: where the bytes of a bundle come from.

`BundleSource.open()` is the public entry and enforces the rules every source
shares: the `[download]` limits (`DownloadConfig`): a cap on the total bytes
read, a stall limit and an optional deadline (`agent.pace`), and translation of
transport failures into `SourceError` with the source named. Subclasses
implement only `_open(pace)`. No source ever blocks without a bound: files,
FIFOs and stdin are polled with the stall window as timeout, sockets carry
timeouts derived from it.

Sources own their files and sockets; the reader only sees `read(n)`, plus,
for sources that can read a range again (http(s), through `agent.ranged`),
`refetch(offset, length)`, which the reader uses when a payload arrives
damaged. `BundleStream.downloaded` counts the bytes that crossed the network
(resumed, skipped and refetched ones included), for the install's report.

`HttpSource` streams a URL through `agent.ranged.HttpRangeSource`: a dropped,
truncated or stalled connection resumes from the byte it reached, with retries
and backoff, never to local disk. The `[download]` table's TLS keys (`ca_file`,
`client_cert`, `client_key`) build its `ssl.SSLContext` unless a caller passes one.
"""

from __future__ import annotations

import logging
import math
import os
import select
import ssl
import stat
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from agent.config import DownloadConfig
from agent.errors import SourceError
from agent.pace import Pace, PaceLimits
from agent.ranged import HttpRangeSource, RangeStream, ResumableSource
from agent.ranged import RawStream as RawStream  # noqa: PLC0414 (re-exported: other sources implement it)
from ota_common.text import clean

log = logging.getLogger(__name__)

DEFAULT_CAP = DownloadConfig().max_bytes
STDIN_FD = 0


class BundleStream:
    """What sources hand the reader: `read(n)` with a byte cap and error translation."""

    def __init__(
        self, raw: RawStream, name: str, cap: int, length: int | None = None, *, ranges: ResumableSource | None = None
    ) -> None:
        self._raw = raw
        self.name = name
        self.cap = cap
        self.length = length  # total size when the source knows it (for progress)
        self.consumed = 0
        self._ranges = ranges
        self.refetches = 0

    @property
    def downloaded(self) -> int:
        """Bytes that crossed the network for this stream (all attempts), else those read."""
        return self._ranges.downloaded if self._ranges is not None else self.consumed

    @property
    def range_source(self) -> ResumableSource | None:
        """The ranged reader behind the stream (http(s), oci://), for adaptive download."""
        return self._ranges

    @property
    def can_refetch(self) -> bool:
        return self._ranges is not None

    def refetch(self, offset: int, length: int) -> RangeStream:
        """Bytes offset..offset+length of the bundle again (a damaged payload)."""
        if self._ranges is None:
            raise SourceError(self.name, "cannot read a range again", transient=False)
        self.refetches += 1
        log.warning("%s: bytes %d..%d arrived damaged; fetching them again", self.name, offset, offset + length)
        return self._ranges.fetch(offset, length)

    def read(self, n: int, /) -> bytes:
        n = min(n, self.cap - self.consumed + 1)
        try:
            data = self._raw.read(n)
        except OSError as e:
            reason = clean(e.strerror or e, 120)
            raise SourceError(self.name, f"read failed after {self.consumed} bytes: {reason}") from None
        if not data and n and self.length is not None and self.consumed < self.length:
            raise SourceError(self.name, f"ended after {self.consumed} of {self.length} bytes")
        self.consumed += len(data)
        if self.consumed > self.cap:
            raise SourceError(self.name, f"more than {self.cap} bytes; refusing to read on", transient=False)
        return data

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> BundleStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BundleSource(ABC):
    def __init__(self, name: str, limits: DownloadConfig | None = None) -> None:
        self.name = name
        self.limits = limits or DownloadConfig()
        self.cap = self.limits.max_bytes
        self.cancel = threading.Event()  # `cancel_with` replaces it by a job's

    def open(self) -> BundleStream:
        lim = self.limits
        pace = Pace(self.name, PaceLimits(lim.stall_bytes, lim.stall_seconds, lim.deadline))
        try:
            raw, length = self._open(pace)
        except SourceError:
            raise
        except (OSError, ValueError) as e:
            reason = clean(e.strerror if isinstance(e, OSError) and e.strerror else e, 120)
            raise SourceError(self.name, f"cannot open: {reason}") from None
        if length is not None and length > self.cap:
            raw.close()
            raise SourceError(self.name, f"{length} bytes is more than the cap of {self.cap}", transient=False)
        return BundleStream(raw, self.name, self.cap, length, ranges=self._ranges())

    @abstractmethod
    def _open(self, pace: Pace) -> tuple[RawStream, int | None]: ...

    def _ranges(self) -> ResumableSource | None:
        """The source's ranged reader, when it can read a range again."""
        return None

    def cancel_with(self, event: threading.Event) -> None:
        """End a retry backoff at once when `event` is set (a job's cancel)."""
        self.cancel = event
        ranged = self._ranges()
        if ranged is not None:
            ranged.cancel = event


class FdStream:
    """Reads a file descriptor without ever blocking past the pace: a regular file
    is read directly, anything else (FIFO, pipe, terminal, device) is polled first."""

    def __init__(self, fd: int, pace: Pace, *, owned: bool) -> None:
        self._fd = fd
        self._pace = pace
        self._owned = owned
        mode = os.fstat(fd).st_mode
        self._poll: select.poll | None = None
        if not stat.S_ISREG(mode):
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN | select.POLLPRI)

    def read(self, n: int, /) -> bytes:
        while True:
            timeout = self._pace.budget()
            if self._poll is not None:
                ready = self._poll.poll(math.ceil(timeout * 1000))
                self._pace.waited()
                if not ready:
                    continue
            try:
                data = os.read(self._fd, n)
            except BlockingIOError:  # a spurious wake-up on a non-blocking descriptor
                continue
            finally:
                self._pace.waited()
            self._pace.delivered(len(data))
            return data

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)


class FileSource(BundleSource):
    """A path: a regular file (its size is known), or a FIFO or device read as a stream."""

    def __init__(self, path: Path, limits: DownloadConfig | None = None) -> None:
        super().__init__(str(path), limits)
        self.path = path

    def _open(self, pace: Pace) -> tuple[RawStream, int | None]:
        try:
            # O_NONBLOCK: opening a FIFO nobody writes to must not hang; poll bounds the waits.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(self.name, f"cannot open: {e.strerror}", transient=False) from None
        try:
            st = os.fstat(fd)
            kind = st.st_mode
            if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind) or stat.S_ISCHR(kind) or stat.S_ISBLK(kind)):
                raise SourceError(self.name, "not a file, FIFO or device", transient=False)
            return FdStream(fd, pace, owned=True), st.st_size if stat.S_ISREG(kind) else None
        except BaseException:
            os.close(fd)
            raise


class StdinSource(BundleSource):
    """Standard input (`-`), read from the descriptor itself, never through a buffer."""

    def __init__(self, limits: DownloadConfig | None = None, fd: int = STDIN_FD) -> None:
        super().__init__("stdin", limits)
        self.fd = fd

    def _open(self, pace: Pace) -> tuple[RawStream, int | None]:
        return FdStream(self.fd, pace, owned=False), None


class HttpSource(BundleSource):
    """An http(s) URL, streamed through `agent.ranged`: resumed and retried inside
    (`[download] retries`), refetchable by range. `tls` replaces the context the
    `[download]` table's TLS keys (or the system CA store) would give."""

    def __init__(self, url: str, limits: DownloadConfig | None = None, *, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(url, limits)
        self.url = url
        if tls is None and url.lower().startswith("https://"):
            tls = tls_context(self.limits, url)
        self.ranged = HttpRangeSource(url, self.limits, tls=tls)

    def _open(self, pace: Pace) -> tuple[RawStream, int | None]:
        stream = self.ranged.stream(0, pace)
        stream.open()  # the first contact, retried: a refusal is an error of open()
        return stream, self.ranged.known_total

    def _ranges(self) -> ResumableSource | None:
        return self.ranged


def tls_context(limits: DownloadConfig, name: str) -> ssl.SSLContext | None:
    """The TLS context the `[download]` table asks for (None: the system CA store)."""
    if limits.ca_file is None and limits.client_cert is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(limits.ca_file) if limits.ca_file else None)
    except (OSError, ssl.SSLError) as e:
        message = f"cannot load ca_file {str(limits.ca_file)!r}: {clean(e, 80)}"
        raise SourceError(name, message, transient=False) from None
    if limits.client_cert is not None:
        key = str(limits.client_key) if limits.client_key else None
        try:
            context.load_cert_chain(str(limits.client_cert), key)
        except (OSError, ssl.SSLError) as e:
            what = f"client_cert {str(limits.client_cert)!r}" + (f" / client_key {key!r}" if key else "")
            raise SourceError(name, f"cannot load {what}: {clean(e, 80)}", transient=False) from None
    return context


def source_for(spec: str, limits: DownloadConfig | None = None, *, tls: ssl.SSLContext | None = None) -> BundleSource:
    """`-` is stdin, http(s):// a URL, oci:// a bundle in a registry (`agent.oci`), anything else a file path."""
    if spec == "-":
        return StdinSource(limits)
    if spec.startswith(("oci://", "oci+http://")):
        from agent.oci import OciSource  # noqa: PLC0415 - agent.oci builds on this module

        return OciSource(spec, limits, tls=tls)
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, limits, tls=tls)
    if "://" in spec:
        message = "unsupported URL scheme (use http://, https://, oci://, a file path or -)"
        raise SourceError(spec, message, transient=False)
    return FileSource(Path(spec), limits)
