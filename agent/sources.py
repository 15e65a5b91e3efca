"""Bundle sources: where the bytes of a bundle come from.

`BundleSource.open()` is the public entry and enforces the rules every source
shares: the `[download]` limits (`DownloadConfig`): a cap on the total bytes
read, a stall limit and an optional deadline (`agent.pace`), and translation of
transport failures into `SourceError` with the source named. Subclasses
implement only `_open(pace)`. No source ever blocks without a bound: files,
FIFOs and stdin are polled with the stall window as timeout, sockets carry
timeouts derived from it.

Sources own their files and sockets; the reader only sees `read(n)`.
"""

from __future__ import annotations

import math
import os
import select
import ssl
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

from agent.config import DownloadConfig
from agent.errors import SourceError
from agent.httpclient import HttpClient
from agent.pace import Pace, PaceLimits
from ota_common.text import clean

DEFAULT_CAP = DownloadConfig().max_bytes
STDIN_FD = 0


class RawStream(Protocol):
    def read(self, n: int, /) -> bytes: ...
    def close(self) -> None: ...


class BundleStream:
    """What sources hand the reader: `read(n)` with a byte cap and error translation."""

    def __init__(self, raw: RawStream, name: str, cap: int, length: int | None = None) -> None:
        self._raw = raw
        self.name = name
        self.cap = cap
        self.length = length  # total size when the source knows it (for progress)
        self.consumed = 0

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
        return BundleStream(raw, self.name, self.cap, length)

    @abstractmethod
    def _open(self, pace: Pace) -> tuple[RawStream, int | None]: ...


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
    """A plain streaming GET over `agent.httpclient`. Retries and range resume
    belong to a later layer. `tls` replaces the system CA store's context."""

    def __init__(self, url: str, limits: DownloadConfig | None = None, *, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(url, limits)
        self.url = url
        self.client = HttpClient(tls=tls, connect_timeout=self.limits.connect_timeout)

    def _open(self, pace: Pace) -> tuple[RawStream, int | None]:
        response = self.client.get(self.url, pace, cap=self.cap)
        if response.status == 200:
            return response, response.length
        response.close()
        code = response.status
        after = f" (after redirect to {clean(response.url, 200)})" if response.url != self.url else ""
        if code >= 400:
            transient = code >= 500 or code == 429
            message = f"HTTP {code} {response.reason}".rstrip() + after
            raise SourceError(self.name, message, transient=transient, status_code=code)
        message = f"unexpected HTTP {code} {response.reason}".rstrip() + after
        raise SourceError(self.name, message, transient=False, status_code=code)


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
