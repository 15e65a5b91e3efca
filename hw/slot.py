"""A slot: a block device or a regular file that holds one image.

Owns positioned writes, durability (fsync), and the read-back hash that reads
from the medium rather than the page cache (the written range is dropped from
the cache with posix_fadvise before reading it back). Does not decide which
slot may be written — the installer does, and `SlotWriter` refuses, as a last
line of defence, the booted slot and any target that shares storage with it
(identity by `hw.slotid`, never by name or path), is mounted, or holds the
running root.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import stat
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from hw import slotid
from hw.errors import SlotError
from ota_common import libc

IO_CHUNK = 4 << 20
_ZEROS = bytes(IO_CHUNK)
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SECTOR = 512


_fallocate = libc.function(("fallocate64", "fallocate"), [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def slot_size(path: Path, name: str) -> int:
    """Capacity of a slot: the size of a block device, or of a regular file."""
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
    except OSError as e:
        raise SlotError(name, f"{path}: {e.strerror}") from None
    raise SlotError(name, f"{path} is neither a block device nor a regular file")


class SlotWriter:
    """Opens a slot for positioned writes, after checking what the opened fd
    really is: a regular file or block device that shares no storage with any
    slot of the booted group (`booted_paths`), is not mounted and does not back
    the running root. The checks run on ``fstat`` of the fd itself, so a link
    swapped in between a check and the open is caught; a block device is opened
    O_EXCL, so the kernel also refuses one that is mounted or held (dm, md, swap)
    and keeps it from being mounted while the slot is written."""

    def __init__(
        self,
        path: Path,
        name: str,
        *,
        booted: str,
        booted_paths: Sequence[Path],
        mountinfo: Path = slotid.MOUNTINFO,
        root: Path = Path("/"),
    ) -> None:
        if name == booted:
            raise SlotError(name, "refusing to open the booted slot for writing")
        self.path = path
        self.name = name
        self.fd = self._open(path, mountinfo)
        try:
            st = os.fstat(self.fd)
            self.block_device = stat.S_ISBLK(st.st_mode)
            if not (self.block_device or stat.S_ISREG(st.st_mode)):
                raise SlotError(name, f"{path} is neither a block device nor a regular file")
            self.identity = slotid.from_stat(path, st)
            self._refuse_shared(booted, booted_paths, mountinfo, root)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            self.capacity = os.lseek(self.fd, 0, os.SEEK_END) if self.block_device else st.st_size
        except OSError as e:
            self.close()
            raise SlotError(name, f"cannot open {path} for writing: {e.strerror}") from None
        except BaseException:
            self.close()
            raise
        self._fast_zero = True

    def _open(self, path: Path, mountinfo: Path) -> int:
        # Slot paths may be symlinks by design (/dev/disk/by-partlabel/...): follow
        # them, then judge the fd. O_NONBLOCK: a FIFO planted here must not hang us.
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                flags |= os.O_EXCL  # on a block device: fail with EBUSY if mounted or held
            return os.open(path, flags)
        except OSError as e:
            if e.errno == errno.EBUSY:
                where = slotid.mounted_at(slotid.identity(path), mountinfo)
                why = f"it is mounted at {where}" if where else "the device is in use (mounted, or held by dm/md/swap)"
                raise SlotError(self.name, f"refusing to write {path}: {why}") from None
            if e.errno == errno.ENXIO:
                raise SlotError(self.name, f"{path} is neither a block device nor a regular file") from None
            raise SlotError(self.name, f"cannot open {path} for writing: {e.strerror}") from None
        except ValueError as e:
            raise SlotError(self.name, f"cannot open {path!r} for writing: {e}") from None

    def _refuse_shared(self, booted: str, booted_paths: Sequence[Path], mountinfo: Path, root: Path) -> None:
        me = self.identity
        for other in booted_paths:
            reason = slotid.overlap(me, slotid.identity(other))
            if reason is not None:
                raise SlotError(
                    self.name,
                    f"refusing to write {self.path}: it overlaps {other} of the booted slot {booted} ({reason})",
                )
        mount_point = slotid.mounted_at(me, mountinfo)
        if mount_point is not None:
            raise SlotError(self.name, f"refusing to write {self.path}: it is mounted at {mount_point}")
        if slotid.backs_root(me, root):
            raise SlotError(self.name, f"refusing to write {self.path}: it holds the running root filesystem")

    def __enter__(self) -> SlotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.capacity:
            raise SlotError(self.name, f"write of {length} bytes at {offset} exceeds slot size {self.capacity}")

    def write(self, offset: int, data: bytes | bytearray) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as e:
            raise SlotError(self.name, f"write at {offset} failed: {e.strerror}") from None

    def write_zeros(self, offset: int, length: int) -> None:
        """Zero a range without sending zero bytes when the medium can: BLKZEROOUT
        on a block device (the sector-aligned part), a punched hole in a file.
        Falls back to writing zeros when the kernel or filesystem says no."""
        self._check_range(offset, length)
        end = offset + length
        if self._fast_zero and length >= IO_CHUNK:
            if self.block_device:
                start, stop = -(-offset // SECTOR) * SECTOR, end // SECTOR * SECTOR
                if stop > start and self._zero_out(start, stop - start):
                    self._write_zero_bytes(offset, start)
                    self._write_zero_bytes(stop, end)
                    return
            elif self._punch_hole(offset, length):
                return
        self._write_zero_bytes(offset, end)

    def _zero_out(self, offset: int, length: int) -> bool:
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
        except OSError:
            self._fast_zero = False
            return False
        return True

    def _punch_hole(self, offset: int, length: int) -> bool:
        if _fallocate is None or _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            self._fast_zero = False
            return False
        return True

    def _write_zero_bytes(self, offset: int, end: int) -> None:
        while offset < end:
            n = min(IO_CHUNK, end - offset)
            self.write(offset, _ZEROS[:n])
            offset += n

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise SlotError(self.name, f"fsync failed: {e.strerror}") from None


class SlotOpener(Protocol):
    """What opens a slot for writing (`SlotWriter`; a test or a new medium may give another)."""

    def __call__(self, path: Path, name: str, *, booted: str, booted_paths: Sequence[Path]) -> SlotWriter: ...


def read_back_sha256(path: Path, name: str, length: int, progress: Callable[[int], None] | None = None) -> str:
    """SHA-256 of the first `length` bytes as stored on the medium, in one pass over a
    slot that is written already (an install reads back while writing: hw.readback)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SlotError(name, f"cannot open {path} for read-back: {e.strerror}") from None
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # to the end: a folio the image ends inside too
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_SEQUENTIAL)
        h = hashlib.sha256()
        done = 0
        # Hash chunk k on a worker while chunk k+1 is read (hashlib releases the GIL),
        # into two buffers used in turn (no fresh 4 MiB mapping per chunk).
        buffers = [memoryview(bytearray(min(IO_CHUNK, max(length, 1)))) for _ in range(2)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-back") as hasher:
            hashing: Future[None] | None = None
            turn = 0
            while done < length:
                buf = buffers[turn][: min(IO_CHUNK, length - done)]
                turn ^= 1
                n = os.preadv(fd, [buf], done)
                if not n:
                    raise SlotError(name, f"read-back ended at {done} of {length} bytes")
                if hashing is not None:
                    hashing.result()  # the buffer read next was hashed
                hashing = hasher.submit(h.update, buf[:n])
                done += n
                if progress:
                    progress(n)
            if hashing is not None:
                hashing.result()
        return h.hexdigest()
    except OSError as e:
        raise SlotError(name, f"read-back failed: {e.strerror}") from None
    finally:
        os.close(fd)


def file_sha256(path: Path, name: str, length: int | None = None) -> str:
    size = slot_size(path, name) if length is None else length
    return read_back_sha256(path, name, size)
