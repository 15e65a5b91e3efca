"""Reading a slot back from the medium while it is still being written.

Owns the overlapped read-back: the whole-image SHA-256 of what the medium
holds, computed by one thread that follows the writers. The writer reports
each range once it is written (`written`); the ranges below the first gap form
the written prefix. The thread starts the writeback of that prefix
(`sync_file_range(SYNC_FILE_RANGE_WRITE)`, so the final fsync finds little left
to write), waits for each piece's writeback to complete (`WAIT_BEFORE | WRITE |
WAIT_AFTER`) and only then reads it back: with O_DIRECT, which bypasses the page
cache (the kernel also writes back and waits for a direct read's range itself),
or where the medium refuses O_DIRECT, buffered, once every byte is written and
written back, after dropping the image's now clean pages from the cache
(`POSIX_FADV_DONTNEED` of the whole slot: over a part, the kernel keeps every
large folio that reaches beyond it, so the fallback cannot follow the writes).

Why this is the same guarantee as a read-back after the final fsync (the
installer switches the slot only after both): every byte is read from the
medium only after its write completed and its writeback finished; the caller
writes each range once and reports it only after writing it (an image's ops
cover it contiguously, each range once: bundler.format.ops), so nothing the
install writes changes a range after it was read back; and a read does not
return other data before and after a cache flush (fsync makes data durable; it
does not change what the medium returns). What the hash covers is therefore
what the medium holds when `finish` returns.

Memory: one 1 MiB page-aligned buffer (O_DIRECT needs the alignment).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from hw.errors import SlotError
from ota_common import libc

CHUNK = 1 << 20  # one read; also the written prefix the thread waits for before it reads
ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of every logical block size in use
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
_WAIT_ALL = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER


_sync_file_range = libc.function(("sync_file_range",), [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


class ReadBackCheck(Protocol):
    """What the installer feeds while writing a slot and asks for the medium's hash at the end."""

    def written(self, offset: int, length: int) -> None: ...

    def finish(self, progress: Callable[[int], None] | None = None) -> str: ...

    def close(self) -> None: ...


class ReadBackOpener(Protocol):
    """(path, bootname, image length) -> a read-back of that slot (`OverlappedReadBack`; a test may give another)."""

    def __call__(self, path: Path, name: str, length: int) -> ReadBackCheck: ...


class OverlappedReadBack:
    """The SHA-256 of the first `length` bytes of a slot as the medium holds them,
    read while the slot is written. `written(offset, length)` for every range once
    it is written (from any thread, in any order, each range once), then
    `finish()`; `close()` always (it stops the thread and closes the files)."""

    def __init__(self, path: Path, name: str, length: int) -> None:
        self.name = name
        self.length = length
        self.direct = True
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SlotError(name, f"cannot open {path} for read-back: {e.strerror}") from None
        try:
            self._direct_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            self._direct_fd, self.direct = -1, False
        self._cond = threading.Condition()
        self._pending: dict[int, int] = {}  # start -> end of written ranges above the prefix
        self._prefix = 0  # every byte below is written
        self._started = 0  # writeback started below this offset
        self._checked = 0  # read back and hashed below this offset
        self._closing = False
        self._error: BaseException | None = None
        self._hash = hashlib.sha256()
        self._buffer = mmap.mmap(-1, CHUNK)
        self._thread = threading.Thread(target=self._follow, name=f"read-back-{name}", daemon=True)
        self._thread.start()

    def written(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        with self._cond:
            self._pending[offset] = offset + length
            advanced = False
            while self._prefix in self._pending:
                self._prefix = self._pending.pop(self._prefix)
                advanced = True
            if advanced:
                self._cond.notify_all()

    def finish(self, progress: Callable[[int], None] | None = None) -> str:
        """Waits until every byte is read back (the caller reported all of them
        written) and returns the hex digest; `progress(n)` as bytes are checked,
        starting with what was checked while the slot was written."""
        with self._cond:
            if self._prefix < self.length:
                raise SlotError(self.name, f"read-back: only {self._prefix} of {self.length} bytes were written")
        reported = 0
        while True:
            with self._cond:
                if self._error is None and self._checked == reported < self.length:
                    self._cond.wait()
                checked, error = self._checked, self._error
            if error is not None:
                raise error
            if progress and checked > reported:
                progress(checked - reported)
            reported = checked
            if checked >= self.length:
                return self._hash.hexdigest()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1
        self._buffer.close()

    def __enter__(self) -> OverlappedReadBack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The thread.

    def _follow(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._ready():
                        self._cond.wait()
                    if self._closing:
                        return
                    prefix = self._prefix
                self._start_writeback(prefix)
                if not self.direct:
                    self._read_rest_buffered()
                    return
                start, end = self._checked, min(prefix, self._checked + CHUNK, self.length)
                try:
                    self._read_direct(start, end)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise SlotError(self.name, f"read-back failed at {start}: {e.strerror}") from None
                    self.direct = False  # no direct reads on this medium: the rest once it is all written
                    continue
                if self._advance(end):
                    return
        except BaseException as e:  # reported by finish(); the thread ends here
            with self._cond:
                self._error = e if isinstance(e, SlotError) else SlotError(self.name, f"read-back failed: {e}")
                self._cond.notify_all()

    def _ready(self) -> bool:
        """O_DIRECT: a whole chunk is written beyond what was checked, or the image's end
        is. Buffered: every byte is written."""
        if self.direct and self._prefix - self._checked >= CHUNK:
            return True
        return self._prefix >= self.length > self._checked

    def _advance(self, end: int) -> bool:
        """Checked up to `end`; True at the image's end."""
        with self._cond:
            self._checked = end
            self._cond.notify_all()
        return end >= self.length

    def _start_writeback(self, prefix: int) -> None:
        if prefix > self._started and _sync_file_range is not None:
            _sync_file_range(self._fd, self._started, prefix - self._started, SYNC_FILE_RANGE_WRITE)
            self._started = prefix

    def _settle(self, offset: int, length: int) -> None:
        """Waits until the range's writeback completed (every write to it reached the medium's queue)."""
        if _sync_file_range is None or _sync_file_range(self._fd, offset, length, _WAIT_ALL) != 0:
            os.fdatasync(self._fd)

    def _read_direct(self, offset: int, end: int) -> None:
        """[offset, end) with aligned reads (the tail rounded up: past the end, a file reads short)."""
        length = end - offset
        self._settle(offset, length)
        view = memoryview(self._buffer)
        try:
            got = 0
            while got < length:
                want = min(len(view) - got, -(-(length - got) // ALIGN) * ALIGN)
                n = os.preadv(self._direct_fd, [view[got : got + want]], offset + got)
                if n <= 0:
                    break
                got += n
                if n % ALIGN:
                    break  # a short, unaligned read: the end of the file
            if got < length:
                raise SlotError(self.name, f"read-back ended at {offset + got} of {self.length} bytes")
            self._hash.update(view[:length])
        finally:
            view.release()

    def _read_rest_buffered(self) -> None:
        """Everything not yet checked, through the page cache, once all is written and
        written back: the cached pages are dropped first, of the whole slot (a large
        folio is dropped only when the range covers all of it, so not the image's
        length, which may end inside one)."""
        start = at = self._checked
        self._settle(start, self.length - start)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)  # 0: to the end, the last folio too
        view = memoryview(self._buffer)
        try:
            while at < self.length:
                n = os.preadv(self._fd, [view[: min(len(view), self.length - at)]], at)
                if n <= 0:
                    raise SlotError(self.name, f"read-back ended at {at} of {self.length} bytes")
                self._hash.update(view[:n])
                at += n
                self._advance(at)
        except OSError as e:
            raise SlotError(self.name, f"read-back failed at {at}: {e.strerror}") from None
        finally:
            view.release()
