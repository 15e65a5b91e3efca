"""Safe file primitives for the agent's own files (state directory, bootloader
files, config): crash-safe replacement and opens that never follow a planted
symbolic link or block on a FIFO.

- `atomic_write`: write a uniquely named temp file (created with O_EXCL and
  O_NOFOLLOW, so a planted link or file at a temp name is never written
  through), fsync it, rename it over the target, fsync the directory. After a
  power cut the path holds either the old or the new content, never a mix; a
  failed write removes its temp file.
- `open_regular` / `read_regular`: open a file that must be a regular file
  without following a symlink in its last component and without blocking (a
  FIFO, device, socket or directory is refused by fstat, never read or
  written); `UnsafeFileError` names the path.
- `ensure_private_dir`: a directory only its owner (the agent) can change.

Does not know what the files hold; callers translate `OSError` into their own
errors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path

TEMP_TOKEN_BYTES = 6
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


class UnsafeFileError(OSError):
    """A path where a regular file is expected names something else (a symlink,
    FIFO, device, socket or directory), or a directory is unsafe to keep state in.
    ``strerror`` says what was found and ``filename`` names the path."""

    def __init__(self, path: Path | str, what: str, code: int = errno.EINVAL) -> None:
        super().__init__(code, what, str(path))


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """Open `path`, which must be (or, with O_CREAT, become) a regular file: a
    symlink in the last component is refused (O_NOFOLLOW), the open cannot block
    (O_NONBLOCK, cleared again once fstat has shown a regular file) and does not
    acquire a controlling terminal. Returns the fd; raises UnsafeFileError for a
    symlink or a non-regular file, OSError for everything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass  # O_CREAT may make it; without O_CREAT the open below says ENOENT
    else:
        if not stat.S_ISREG(st.st_mode):  # never open a device: opening alone can act (a watchdog starts)
            raise UnsafeFileError(path, _refusal(st.st_mode), errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.EINVAL)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError(path, "is a symbolic link; refusing to follow it", errno.ELOOP) from None
        if e.errno == errno.ENXIO:  # O_WRONLY on a FIFO without a reader, or a device without its driver
            raise UnsafeFileError(path, "is not a regular file (a FIFO or device); refusing to open it",
                                  errno.ENXIO) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(path, _refusal(st.st_mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "is a symbolic link; refusing to follow it"
    return f"is {kind_of(mode)}, not a regular file; refusing to use it"


def read_regular(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of the regular file at `path` (pass MAX + 1 to tell
    an oversized file from one of exactly MAX bytes)."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        chunks: list[bytes] = []
        got = 0
        while got < limit:
            chunk = os.read(fd, min(limit - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` (file mode `mode`, exactly). A symlink at
    `path` itself is replaced, never written through. Temp files a power cut
    left behind (no writer holds their lock any more) are removed afterwards."""
    fd, tmp = _create_temp(path, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
            os.replace(tmp, path)
        finally:
            os.close(fd)  # held (and flock-ed) until renamed: a live temp is never taken for a stray
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    _remove_strays(path)


def _temp_name(path: Path, token: str) -> Path:
    return path.with_name(f".{path.name}.{token}.tmp")


def _create_temp(path: Path, mode: int) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = _temp_name(path, secrets.token_hex(TEMP_TOKEN_BYTES))
        try:
            fd = os.open(tmp, flags, mode & 0o777)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # "in use": see _remove_strays
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _remove_strays(path: Path) -> None:
    """Unlink temp files of `path` that no writer holds: left by a power cut or
    planted (a link is unlinked itself, never followed). Best effort."""
    prefix, suffix = f".{path.name}.", ".tmp"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        token = name[len(prefix) : -len(suffix)]
        if not (name.startswith(prefix) and name.endswith(suffix) and len(token) == 2 * TEMP_TOKEN_BYTES):
            continue
        stray = path.parent / name
        try:
            if not stat.S_ISREG(os.lstat(stray).st_mode):
                os.unlink(stray)  # planted: a link is removed itself, a device or FIFO never opened
                continue
            fd = os.open(stray, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(stray)
        except OSError:
            pass  # a writer holds it
        finally:
            os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path, mode: int = 0o777) -> None:
    """`mkdir -p` that survives a power cut: each directory it creates is followed
    by an fsync of its parent, so the new entry (and what is later written and
    synced inside it) is not lost with the parent's unsynced metadata."""
    missing: list[Path] = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=mode)
        fsync_dir(d.parent)


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` (mode 0700) when missing; refuse one that is not a
    directory, is not owned by this process's user, or that group or others may
    write (they could plant links or files for the agent to trust or overwrite)."""
    make_dirs(directory, 0o700)
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFileError(directory, f"is {kind_of(st.st_mode)}, not a directory", errno.ENOTDIR)
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UnsafeFileError(
            directory,
            f"is owned by uid {st.st_uid}, not by the agent (uid {uid}); fix with: chown {uid} '{directory}'",
            errno.EPERM,
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFileError(
            directory,
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); fix with: chmod go-w '{directory}'",
            errno.EPERM,
        )
