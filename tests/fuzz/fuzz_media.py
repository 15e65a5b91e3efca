"""Fuzz the USB stick scan (agent.media.scan): the input describes a directory
tree (names, nesting, files, symbolic links, FIFOs) that is built in a scratch
directory and scanned with small limits. Whatever the tree, the scan returns:
candidates within the candidate bound, every entry counted within the entry
bound, nothing followed through a link, no name longer than the layout allows."""

from __future__ import annotations

import os
import shutil

from agent.media.scan import DIR_FLAGS, Limits, scan
from tests.fuzz._harness import main, scratch_dir

LIMITS = Limits(depth=3, entries=40, name=64, candidates=4)


def build(root: bytes, data: bytes) -> None:
    cwd = [root]
    i = 0
    while i + 2 <= len(data) and i < 400:
        kind, n = data[i] % 6, 1 + data[i + 1] % 24
        name = data[i + 2 : i + 2 + n].replace(b"/", b"_").replace(b"\0", b"_") or b"x"
        i += 2 + n
        if name in (b".", b".."):
            name = b"dots"
        path = os.path.join(cwd[-1], name)
        try:
            if kind == 0:
                os.mkdir(path)
                if len(cwd) < 5:
                    cwd.append(path)
            elif kind == 1 and len(cwd) > 1:
                cwd.pop()
            elif kind == 2:
                _create(path + b".otab", name)
            elif kind == 3:
                os.symlink(b"/etc" if n % 2 else b"..", path + b".otab")
            elif kind == 4:
                os.mkfifo(path + b".otab")
            else:
                _create(path, b"")
        except OSError:
            pass


def _create(path: bytes, data: bytes) -> None:
    """A new regular file (never opens what is there already: a FIFO would block)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def one_input(data: bytes) -> None:
    root = scratch_dir() / "stick"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    build(os.fsencode(root), data)
    fd = os.open(root, DIR_FLAGS)
    try:
        result = scan(fd, LIMITS)
    finally:
        os.close(fd)
    assert len(result.candidates) <= LIMITS.candidates
    assert result.entries <= LIMITS.entries + 1
    for parts in result.candidates:
        assert len(parts) <= LIMITS.depth + 1
        assert all(len(p.encode(errors="surrogateescape")) <= LIMITS.name for p in parts)
        for k in range(1, len(parts) + 1):
            assert not root.joinpath(*parts[:k]).is_symlink(), parts


if __name__ == "__main__":
    main(one_input)
