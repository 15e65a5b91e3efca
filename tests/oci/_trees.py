"""What a filesystem image holds, for comparing: every path's type, mode, owner,
size, content digest, symlink target, device numbers, xattrs and hardlink
group; and a read-only loop mount that is always undone."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path


def summary(root: Path, *, skip: tuple[str, ...] = ("lost+found",)) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    links: dict[tuple[int, int], str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not (dirpath == str(root) and d in skip))
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(kind):
                extra = hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1:
                    extra = (extra, "linked-to", links.setdefault(key, rel))
            elif stat.S_ISLNK(kind):
                extra = os.readlink(p)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                names = os.listxattr(p, follow_symlinks=False)
            except OSError as e:  # a squashfs built without an xattr table answers ENOTSUP
                if e.errno != errno.EOPNOTSUPP:
                    raise
                names = []
            xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False)) for k in names))
            out[rel] = (oct(st.st_mode), st.st_uid, st.st_gid, extra, xattrs)
    return out


@contextlib.contextmanager
def mounted(image: Path, where: Path, fstype: str) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", fstype, "-o", "loop,ro", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
