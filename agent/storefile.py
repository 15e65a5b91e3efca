"""The agent's own small files in STATE_DIR: reading one with a size bound
(regular files only, never through a symlink, never blocking on a FIFO), and
setting aside one the agent cannot use.

Setting aside renames `NAME` to `NAME.corrupt-<UTC time>` in the same
directory (a numeric suffix if that name is taken) and fsyncs the directory:
the bytes are kept for whoever investigates, never deleted, and the agent
starts over with what it could recover. Does not decide what is corrupt; the
state store and the outbox do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from ota_common.fsutil import UnsafeFileError, fsync_dir, make_dirs, open_regular, read_regular

NotRegularError = UnsafeFileError  # the path names a symlink, FIFO, device or directory


def read_bounded(path: Path, limit: int) -> bytes:
    """At most `limit + 1` bytes of `path` (so the caller can tell "too big");
    raises FileNotFoundError, NotRegularError or another OSError."""
    return read_regular(path, limit + 1)


def describe_os_error(e: OSError) -> str:
    return e.strerror or type(e).__name__


def aside_name(path: Path, now: datetime) -> Path:
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    return candidate


def set_aside(path: Path, now: datetime) -> Path:
    """Rename `path` out of the way (never deleting it); returns the new name.
    Callers hold the lock that serialises writers of `path`."""
    target = aside_name(path, now)
    os.rename(path, target)
    fsync_dir(path.parent)
    return target


def ensure_dir(directory: Path) -> None:
    """Create the state directory if needed, making its own entry durable."""
    if directory.is_dir():
        return
    make_dirs(directory)
    fsync_dir(directory.parent)


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on the lock file `path` (created if needed), waiting
    for it: for short read-modify-write steps, not for a whole install."""
    ensure_dir(path.parent)
    fd = open_regular(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
