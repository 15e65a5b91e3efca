"""The chosen bundle on a stick as a `BundleSource` the normal install path
reads: first the head bytes selection already read and verified, replayed from
memory, then the rest read on from the same descriptor, which is positioned
right after them. Never reopened, never rewound: each byte of the stick is read
once, so the bytes installed are the bytes whose signature was checked (the
installer checks the replayed head's signature again, from memory).

A source opens once; it takes over the head's descriptor. A read error (EIO
from a pulled stick) surfaces as the usual `SourceError`, and the installer
leaves the target slot unbootable.
"""

from __future__ import annotations

from agent.config import DownloadConfig
from agent.errors import SourceError
from agent.media.select import Head
from agent.pace import Pace
from agent.sources import BundleSource, FdStream, RawStream


class _Replay:
    """`head` from memory, then `rest`."""

    def __init__(self, head: bytes, rest: FdStream) -> None:
        self._head = memoryview(head)
        self._at = 0
        self._rest = rest

    def read(self, n: int, /) -> bytes:
        if self._at < len(self._head):
            chunk = bytes(self._head[self._at : self._at + n])
            self._at += len(chunk)
            return chunk
        return self._rest.read(n)

    def close(self) -> None:
        self._head = memoryview(b"")
        self._rest.close()


class MediaSource(BundleSource):
    def __init__(self, head: Head, medium: str, limits: DownloadConfig | None = None) -> None:
        super().__init__(f"{medium}: {head.path}", limits)
        self.head = head

    def _open(self, pace: Pace) -> tuple[RawStream, int | None]:
        head = self.head
        if head.fd < 0:
            raise SourceError(self.name, "already read once; insert the stick again", transient=False)
        stream = _Replay(head.raw, FdStream(head.fd, pace, owned=True))
        head.fd = -1  # the stream owns it now
        return stream, head.size
