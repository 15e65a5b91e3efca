"""Slot identity: which storage a slot path really names, and whether two
slots share any of it.

Owns resolving a slot to the storage behind it, never by path text:
- a regular file is its inode, (st_dev, st_ino), whatever link or spelling
  names it;
- a block device is its device number and, through sysfs
  (/sys/dev/block/MAJ:MIN), what it is made of: a partition is a byte range of
  its whole disk, a device-mapper or md device is made of its slaves, a loop
  device is (a byte range of) its backing file;
- a path that does not exist yet is its resolved path.
Each slot becomes a set of `Region`s (a byte range of a leaf: a disk, a file's
inode, or a not-yet-existing path); two slots overlap when regions on the same
leaf intersect, or when one is a block device holding the filesystem that
stores the other (a file). Also answers whether a slot is mounted
(/proc/self/mountinfo, injectable for tests) or backs the booted root ("/").
Where sysfs cannot tell (a dm table using part of a slave), the answer errs
towards "overlaps". Does not open slots for writing: hw/slot.py does.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SYS_DEV_BLOCK = Path("/sys/dev/block")
MOUNTINFO = Path("/proc/self/mountinfo")
SECTOR = 512  # sysfs start/size are always in 512-byte units
END = 1 << 63  # "to the end" of a leaf
MAX_DEPTH = 8  # stacked devices (dm on loop on partition ...) followed this deep
MAX_MOUNTINFO = 4 << 20
MAX_SYSFS = 4096


class Kind(enum.Enum):
    FILE = "file"
    BLOCK = "block device"
    MISSING = "path"  # does not exist (yet), or cannot be examined
    OTHER = "other"  # exists, but is neither: a directory, FIFO, character device ...


@dataclass(frozen=True, slots=True)
class Region:
    leaf: str  # "disk 8:0", "inode 254:0/1234", "path /x/y": what the bytes live on
    label: str  # the leaf for people: a device name or a file path
    start: int = 0
    end: int = END

    def meets(self, other: Region) -> bool:
        return self.leaf == other.leaf and self.start < other.end and other.start < self.end


@dataclass(frozen=True, slots=True)
class SlotId:
    path: Path  # as configured
    resolved: Path
    kind: Kind
    dev: int = 0  # st_dev: the filesystem holding a file
    ino: int = 0
    rdev: int = 0  # a block device's number
    regions: tuple[Region, ...] = ()

    def describe(self) -> str:
        if self.kind is Kind.FILE:
            return f"file {self.resolved}"
        if self.kind is Kind.BLOCK:
            return f"block device {self.resolved} ({_devno(self.rdev)})"
        return str(self.resolved)


def identity(path: Path) -> SlotId:
    """What `path` names now (symlinks resolved, links and spellings folded)."""
    resolved = Path(os.path.realpath(path))
    try:
        st = os.stat(resolved)
    except (OSError, ValueError):
        return SlotId(path, resolved, Kind.MISSING, regions=(Region(f"path {resolved}", str(resolved)),))
    return from_stat(path, st, resolved)


def from_stat(path: Path, st: os.stat_result, resolved: Path | None = None) -> SlotId:
    """The identity of an opened slot (`os.fstat` of its fd), so what is checked
    is exactly what will be written."""
    resolved = resolved if resolved is not None else Path(os.path.realpath(path))
    if stat.S_ISREG(st.st_mode):
        return SlotId(path, resolved, Kind.FILE, st.st_dev, st.st_ino, regions=(_inode_region(st, resolved),))
    if stat.S_ISBLK(st.st_mode):
        regions = tuple(_block_regions(st.st_rdev, 0))
        return SlotId(path, resolved, Kind.BLOCK, st.st_dev, st.st_ino, st.st_rdev, regions)
    return SlotId(path, resolved, Kind.OTHER, st.st_dev, st.st_ino, regions=(_inode_region(st, resolved),))


def overlap(a: SlotId, b: SlotId) -> str | None:
    """Why writing one of `a`, `b` can change the other, or None when they are
    disjoint."""
    if a.kind is Kind.MISSING or b.kind is Kind.MISSING:
        return f"both name {a.resolved}" if a.resolved == b.resolved else None
    if a.kind is Kind.FILE and b.kind is Kind.FILE:
        if (a.dev, a.ino) != (b.dev, b.ino):
            return None
        if a.resolved == b.resolved:
            return f"both resolve to {a.resolved}, the same file"
        return f"{a.resolved} and {b.resolved} are the same file (hard links to inode {a.ino} on {_devno(a.dev)})"
    if a.kind is Kind.BLOCK and b.kind is Kind.BLOCK and a.rdev == b.rdev:
        if a.resolved == b.resolved:
            return f"both resolve to {a.resolved}, the same block device {_devno(a.rdev)}"
        return f"{a.resolved} and {b.resolved} are the same block device {_devno(a.rdev)}"
    shared = _shared(a.regions, b.regions)
    if shared is not None:
        return f"both use {shared}"
    for disk, file in ((a, b), (b, a)):
        if disk.kind is Kind.BLOCK and file.kind in (Kind.FILE, Kind.OTHER):
            holder = _shared(disk.regions, tuple(_block_regions(file.dev, 0)))
            if holder is not None:
                return f"{disk.resolved} holds the filesystem that stores {file.resolved} ({holder})"
    return None


def overlaps(a: SlotId, b: SlotId) -> bool:
    return overlap(a, b) is not None


def mounted_at(slot: SlotId, mountinfo: Path = MOUNTINFO) -> str | None:
    """The mount point of a mounted filesystem whose device shares storage with
    `slot` (the slot itself, a partition of it, its disk, a loop device over it),
    or None."""
    seen: dict[int, tuple[Region, ...]] = {}
    for devno, mount_point in _mounts(mountinfo):
        if os.major(devno) == 0:  # a virtual filesystem (proc, tmpfs, overlay): no storage to share
            continue
        if devno not in seen:
            seen[devno] = tuple(_block_regions(devno, 0))
        if (slot.kind is Kind.BLOCK and slot.rdev == devno) or _shared(slot.regions, seen[devno]) is not None:
            return mount_point
    return None


def backs_root(slot: SlotId, root: Path = Path("/")) -> bool:
    """Whether `slot` is (part of) the storage the running root filesystem lives on."""
    try:
        devno = os.stat(root).st_dev
    except OSError:
        return False
    if slot.kind is Kind.BLOCK and slot.rdev == devno:
        return True
    return _shared(slot.regions, tuple(_block_regions(devno, 0))) is not None


# --- sysfs ------------------------------------------------------------------------


def _devno(devno: int) -> str:
    return f"{os.major(devno)}:{os.minor(devno)}"


def _inode_region(st: os.stat_result, path: Path) -> Region:
    return Region(f"inode {_devno(st.st_dev)}/{st.st_ino}", str(path))


def _read_sys(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(MAX_SYSFS).decode("utf-8", "replace").strip()
    except OSError:
        return None


def _sys_int(path: Path) -> int | None:
    text = _read_sys(path)
    return int(text) if text is not None and text.isdigit() else None


def _sys_devno(node: Path) -> int | None:
    text = _read_sys(node / "dev")
    major, _, minor = (text or "").partition(":")
    if not (major.isdigit() and minor.isdigit()):
        return None
    return os.makedev(int(major), int(minor))


def _block_regions(devno: int, depth: int) -> list[Region]:
    """The storage block device `devno` is made of."""
    whole = [Region(f"disk {_devno(devno)}", _devno(devno))]
    if depth > MAX_DEPTH:
        return whole
    try:
        node = (SYS_DEV_BLOCK / _devno(devno)).resolve(strict=True)
    except (OSError, RuntimeError):
        return whole  # no sysfs entry (or a virtual filesystem's anonymous device)
    whole = [Region(f"disk {_devno(devno)}", node.name)]
    if (node / "partition").exists():
        parent = _sys_devno(node.parent)
        start, size = _sys_int(node / "start"), _sys_int(node / "size")
        if parent is None or start is None or size is None:
            return whole
        outer = _block_regions(parent, depth + 1)
        if len(outer) != 1:
            return outer  # a partition of a stacked device: all of it, to be safe
        o = outer[0]
        begin = o.start + start * SECTOR
        return [Region(o.leaf, f"{o.label} (partition {node.name})", begin, min(o.end, begin + size * SECTOR))]
    backing = _read_sys(node / "loop" / "backing_file")
    if backing:
        offset = _sys_int(node / "loop" / "offset") or 0
        limit = _sys_int(node / "loop" / "sizelimit") or 0
        return [
            Region(r.leaf, f"{r.label} (behind {node.name})", r.start + offset,
                   min(r.end, r.start + offset + limit) if limit else r.end)
            for r in _path_regions(Path(backing), depth + 1)
        ]
    slaves: list[Region] = []
    for slave in _listdir(node / "slaves"):
        slave_devno = _sys_devno(node / "slaves" / slave)
        if slave_devno is not None:
            slaves.extend(_block_regions(slave_devno, depth + 1))
    return slaves or whole


def _path_regions(path: Path, depth: int) -> list[Region]:
    """Regions of a loop device's backing file (itself a file or a block device)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return [Region(f"path {path}", str(path))]  # e.g. "/x (deleted)"
    if stat.S_ISBLK(st.st_mode):
        return _block_regions(st.st_rdev, depth)
    return [_inode_region(st, path)]


def _listdir(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _shared(a: tuple[Region, ...], b: tuple[Region, ...]) -> str | None:
    """What two region sets share, for people, or None."""
    for ra in a:
        for rb in b:
            if ra.meets(rb):
                lo, hi = max(ra.start, rb.start), min(ra.end, rb.end)
                named = rb if (rb.start, rb.end) != (0, END) else ra  # the partition or loop range, if any
                if (lo, hi) == (0, END):
                    return named.label
                return f"{named.label}, bytes {lo}..{'end' if hi == END else hi}"
    return None


def _unescape_mount_point(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts(mountinfo: Path) -> Iterator[tuple[int, str]]:
    """(device number, mount point) of every mount in a mountinfo file."""
    try:
        with mountinfo.open("rb") as f:
            text = f.read(MAX_MOUNTINFO).decode("utf-8", "replace")
    except OSError:
        return
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            yield os.makedev(int(major), int(minor)), _unescape_mount_point(fields[4])
