"""Filesystem images of a staging tree with the Debian tools, reproducibly:
the same tree, epoch and UUID give the same bytes.

- ext4: `mkfs.ext4 -d` with a fixed UUID and directory hash seed and
  `E2FSPROGS_FAKE_TIME`; mke2fs copies each inode's ctime from the staging
  tree (which no one can set), so a `debugfs` pass then sets every used
  inode's ctime to the epoch (and, when the tree was staged without root, its
  owner to root: the stager refused anything not owned by root).
- erofs: `mkfs.erofs -T EPOCH -U UUID` (erofs-utils 1.5: from a directory).
- squashfs: `mksquashfs -reproducible -all-time EPOCH -mkfs-time EPOCH`.

`--size` is the ext4 filesystem size; erofs and squashfs size themselves and
`--size` is then the most they may take (a slot's size)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from bundler.oci.errors import OciError

FILESYSTEMS = ("ext4", "erofs", "squashfs")
TOOLS = {"ext4": ("mkfs.ext4", "debugfs", "dumpe2fs"), "erofs": ("mkfs.erofs",), "squashfs": ("mksquashfs",)}
PACKAGES = {"ext4": "e2fsprogs", "erofs": "erofs-utils", "squashfs": "squashfs-tools"}
MIB = 1 << 20


def check_tools(fs: str) -> None:
    if fs not in FILESYSTEMS:
        raise OciError(f"--fs: {fs[:40]!r} is not one of {', '.join(FILESYSTEMS)}")
    for tool in TOOLS[fs]:
        if shutil.which(tool) is None:
            raise OciError(f"--fs {fs}: {tool} not found (install the {PACKAGES[fs]} package)")


def _run(argv: list[str], what: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            errors="replace",
            env={**os.environ, "LC_ALL": "C", **(env or {})},
            check=False,
        )
    except OSError as e:
        raise OciError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
        raise OciError(f"{what}: {argv[0]} failed (exit {done.returncode}): {last[0]}")
    return done.stdout


def estimate_ext4_size(root: Path) -> int:
    """Room for the tree: data in 4 KiB blocks, one block per directory, 256
    bytes per inode, plus a quarter and 16 MiB for metadata and the journal."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirs, files in os.walk(root):
        total += 4096
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += -(-st.st_size // 4096) * 4096 + 256
    size = total + total // 4 + 16 * MIB
    return -(-size // (4 * MIB)) * (4 * MIB)


def _used_inodes(image: Path) -> list[int]:
    """Inodes in use, from dumpe2fs's per-group free-inode ranges."""
    out = _run(["dumpe2fs", str(image)], "ext4 image")
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    used: list[int] = []
    group = -1
    for line in out.splitlines():
        m = re.match(r"Group (\d+):", line)
        if m:
            group = int(m.group(1))
            continue
        m = re.match(r"\s+Free inodes:\s*(.*)$", line)
        if m and group >= 0:
            free: set[int] = set()
            for part in filter(None, (p.strip() for p in m.group(1).split(","))):
                lo, _, hi = part.partition("-")
                free.update(range(int(lo), int(hi or lo) + 1))
            first = group * per_group + 1
            used += [i for i in range(first, first + per_group) if i not in free]
    return used


def make_ext4(root: Path, out: Path, size: int, epoch: int, fs_uuid: uuid.UUID, *, staged_as_root: bool) -> None:
    env = {"E2FSPROGS_FAKE_TIME": str(epoch)}
    u = str(fs_uuid)
    argv = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-U", u, "-E", f"hash_seed={u},root_owner=0:0"]
    argv += ["-L", "rootfs", "-d", str(root), str(out), str(size // 1024) + "k"]
    try:
        _run(argv, f"ext4 image of {size} bytes", env)
    except OciError as e:
        if "Could not allocate" in str(e) or "No space" in str(e):
            raise OciError(f"--size {size}: the image's files do not fit ({e})") from None
        raise
    lines = []
    for ino in _used_inodes(out):
        lines += [f"sif <{ino}> ctime {epoch}", f"sif <{ino}> atime {epoch}"]
        if not staged_as_root and ino > 10:
            lines += [f"sif <{ino}> uid 0", f"sif <{ino}> gid 0"]
    _run(["debugfs", "-w", "-f", "-", str(out)], "ext4 image (fixing inode times)", env, "\n".join(lines) + "\n")


def make_erofs(root: Path, out: Path, epoch: int, fs_uuid: uuid.UUID, *, staged_as_root: bool) -> None:
    argv = ["mkfs.erofs", "--quiet", f"-T{epoch}", f"-U{fs_uuid}"]
    if not staged_as_root:
        argv.append("--all-root")
    _run([*argv, str(out), str(root)], "erofs image")


def make_squashfs(root: Path, out: Path, epoch: int, *, staged_as_root: bool) -> None:
    argv = ["mksquashfs", str(root), str(out), "-noappend", "-no-progress", "-quiet", "-reproducible"]
    argv += ["-all-time", str(epoch), "-mkfs-time", str(epoch), "-processors", "1"]
    if not staged_as_root:
        argv.append("-all-root")
    _run(argv, "squashfs image")


def make(
    fs: str, root: Path, out: Path, size: int | None, *, epoch: int, fs_uuid: uuid.UUID, staged_as_root: bool
) -> int:
    """Build `out`; returns its size in bytes."""
    check_tools(fs)
    if fs == "ext4":
        make_ext4(root, out, size or estimate_ext4_size(root), epoch, fs_uuid, staged_as_root=staged_as_root)
    elif fs == "erofs":
        make_erofs(root, out, epoch, fs_uuid, staged_as_root=staged_as_root)
    else:
        make_squashfs(root, out, epoch, staged_as_root=staged_as_root)
    length = out.stat().st_size
    if size is not None and length > size:
        raise OciError(f"--size {size}: the {fs} image takes {length} bytes")
    return length
