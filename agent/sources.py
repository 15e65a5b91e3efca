"""Bundle sources: where the bytes of a bundle come from.

`BundleSource.open()` is the public entry and enforces the rules every source
shares — a cap on the total bytes read and translation of transport failures
into `SourceError` with the source named. Subclasses implement only `_open()`.
Sources own their files and sockets; the reader only sees `read(n)`.
"""

from __future__ import annotations

import http.client
import sys
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from agent.errors import SourceError

DEFAULT_CAP = 1 << 40  # 1 TiB: no real bundle is larger; stops a server streaming forever
HTTP_TIMEOUT = 30.0
USER_AGENT = "edge-ota-agent/0.1"


class BundleStream:
    """What sources hand the reader: `read(n)` with a byte cap and error translation."""

    def __init__(self, raw: BinaryIO, name: str, cap: int, length: int | None = None) -> None:
        self._raw = raw
        self.name = name
        self.cap = cap
        self.length = length  # total size when the source knows it (for progress)
        self.consumed = 0

    def read(self, n: int, /) -> bytes:
        n = min(n, self.cap - self.consumed + 1)
        try:
            data = self._raw.read(n)
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(self.name, f"read failed after {self.consumed} bytes: {e}") from None
        if not data and n and self.length is not None and self.consumed < self.length:
            raise SourceError(self.name, f"connection ended after {self.consumed} of {self.length} bytes")
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
    def __init__(self, name: str, cap: int = DEFAULT_CAP) -> None:
        self.name = name
        self.cap = cap

    def open(self) -> BundleStream:
        try:
            raw, length = self._open()
        except SourceError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise SourceError(self.name, f"cannot open: {e}") from None
        return BundleStream(raw, self.name, self.cap, length)

    @abstractmethod
    def _open(self) -> tuple[BinaryIO, int | None]: ...


class FileSource(BundleSource):
    def __init__(self, path: Path, cap: int = DEFAULT_CAP) -> None:
        super().__init__(str(path), cap)
        self.path = path

    def _open(self) -> tuple[BinaryIO, int | None]:
        try:
            f = self.path.open("rb")
        except OSError as e:
            raise SourceError(self.name, f"cannot open: {e.strerror}", transient=False) from None
        return f, self.path.stat().st_size


class StdinSource(BundleSource):
    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        super().__init__("stdin", cap)

    def _open(self) -> tuple[BinaryIO, int | None]:
        return sys.stdin.buffer, None


class HttpSource(BundleSource):
    """A plain streaming GET. Retries and range resume belong to a later layer."""

    def __init__(self, url: str, cap: int = DEFAULT_CAP, timeout: float = HTTP_TIMEOUT) -> None:
        super().__init__(url, cap)
        self.url = url
        self.timeout = timeout

    def _open(self) -> tuple[BinaryIO, int | None]:
        request = urllib.request.Request(self.url, headers={"User-Agent": USER_AGENT})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            transient = e.code >= 500 or e.code == 429
            raise SourceError(self.name, f"HTTP {e.code} {e.reason}", transient=transient, status_code=e.code) from None
        except urllib.error.URLError as e:
            raise SourceError(self.name, f"cannot connect: {e.reason}") from None
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None


def source_for(spec: str, cap: int = DEFAULT_CAP) -> BundleSource:
    """`-` is stdin, http(s):// a URL, anything else a file path."""
    if spec == "-":
        return StdinSource(cap)
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, cap)
    if "://" in spec:
        raise SourceError(spec, "unsupported URL scheme (use http://, https://, a file path or -)", transient=False)
    return FileSource(Path(spec), cap)
