"""Getting at a stick's files: a block device is mounted read-only with
`nosuid,nodev,noexec` in a private directory the agent creates (under
STATE_DIR/media, mode 0700) and is always unmounted again, even when the stick
was pulled (a lazy unmount then); a directory is taken as it is (someone else
mounted it, and unmounts it).

Filesystems: vfat, exfat and ext2/3/4, by the kernel when it has the driver
(/proc/filesystems), else by a FUSE driver when one is installed (`fusefat`,
`mount.exfat-fuse`), read-only. The type is probed with `blkid -p` for these
types only; anything else is refused unmounted.

A block device that shares storage with a slot or the running root, or that
is mounted already, is refused before anything is mounted (`check_foreign`).

Writing back (receipts) asks for a read-write remount of a kernel mount only
after every bundle descriptor is closed; a write-protected stick, a FUSE mount
or a read-only directory yields no writable root, and the receipt goes to the
outbox alone. Owns mounting and unmounting only, not what is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.media.errors import MediaError
from hw import slotid
from ota_common.fsutil import ensure_private_dir
from ota_common.text import clean

log = logging.getLogger(__name__)

OPTIONS = "ro,nosuid,nodev,noexec"
RW_OPTIONS = "remount,rw,nosuid,nodev,noexec"
TYPES = ("vfat", "exfat", "ext4", "ext3", "ext2")
FUSE_DRIVERS = {"vfat": "fusefat", "exfat": "mount.exfat-fuse"}
TOOL_TIMEOUT = 60.0
PROC_FILESYSTEMS = Path("/proc/filesystems")


@dataclass(frozen=True, slots=True)
class Medium:
    """A stick's root, open as a directory descriptor for the scan."""

    root: Path
    root_fd: int
    device: Path | None  # the block device, when the agent mounted it
    fstype: str | None
    fuse: bool = False

    @property
    def name(self) -> str:
        return str(self.device or self.root)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise MediaError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise MediaError(f"{argv[0]} did not finish within {TOOL_TIMEOUT:.0f} s") from None


def _tool_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return clean(lines[-1] if lines else f"exit status {result.returncode}", 200)


def probe_type(device: Path) -> str:
    """The filesystem on `device`: blkid's low-level probe for TYPES only (nothing
    else is probed, so nothing else of the stick is read)."""
    result = _run(["blkid", "-p", "-n", ",".join(TYPES), "-o", "value", "-s", "TYPE", str(device)])
    fstype = result.stdout.strip()
    if result.returncode != 0 or not fstype:
        raise MediaError(f"{device}: no {', '.join(TYPES)} filesystem found")
    if fstype not in TYPES:
        raise MediaError(f"{device}: filesystem {clean(fstype, 32)!r} is not one of {', '.join(TYPES)}")
    return fstype


def kernel_has(fstype: str) -> bool:
    try:
        listed = PROC_FILESYSTEMS.read_text()
    except OSError:
        return False
    return fstype in {line.split()[-1] for line in listed.splitlines() if line.split()}


def check_foreign(path: Path, slots: Sequence[tuple[str, Path]]) -> None:
    """Refuse a block device that is not a stick: one sharing storage with a
    slot (bootname, path) or with the running root filesystem, or one already
    mounted (a second mount shares its superblock: remounting ours read-write
    for the receipt would make theirs writable too). Compared by identity
    (`hw.slotid`: device numbers, sysfs, the mount table), never by name."""
    stick = slotid.identity(path)
    for bootname, slot_path in slots:
        why = slotid.overlap(stick, slotid.identity(slot_path))
        if why is not None:
            raise MediaError(f"{path} is not removable media: it shares storage with slot {bootname} ({why})")
    if slotid.backs_root(stick):
        raise MediaError(f"{path} is not removable media: it holds the running root filesystem")
    where = slotid.mounted_at(stick)
    if where is not None:
        raise MediaError(f"{path} is already mounted at {clean(where, 200)}; pass that directory instead")


@contextlib.contextmanager
def medium(path: Path, work_dir: Path, slots: Sequence[tuple[str, Path]] = ()) -> Iterator[Medium]:
    """The medium at `path` (a block device or a directory) for the block;
    `slots` (bootname, path) are refused as media (`check_foreign`)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise MediaError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        fd = _open_root(path)
        try:
            yield Medium(path, fd, None, None)
        finally:
            os.close(fd)
        return
    if not stat.S_ISBLK(st.st_mode):
        raise MediaError(f"{path}: not a block device or a directory")
    try:
        ensure_private_dir(work_dir)
        _clean_leftovers(work_dir)  # before the check: a leftover of ours is "already mounted" too
    except OSError as e:
        raise MediaError(f"{work_dir}: unusable for mount points: {e.strerror}") from None
    check_foreign(path, slots)
    fstype = probe_type(path)
    fuse = not kernel_has(fstype)
    if fuse and (fstype not in FUSE_DRIVERS or shutil.which(FUSE_DRIVERS[fstype]) is None):
        raise MediaError(f"{path}: this kernel cannot mount {fstype} and no FUSE driver for it is installed")
    try:
        point = Path(tempfile.mkdtemp(prefix="stick-", dir=work_dir))
    except OSError as e:
        raise MediaError(f"{work_dir}: cannot create a mount point: {e.strerror}") from None
    try:
        _mount(path, point, fstype, fuse)
        try:
            fd = _open_root(point)
            try:
                yield Medium(point, fd, path, fstype, fuse)
            finally:
                os.close(fd)
        finally:
            unmount(point)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(point)


def _clean_leftovers(work_dir: Path) -> None:
    """Mount points an agent killed mid-visit left behind: unmounted and removed."""
    for entry in sorted(os.listdir(work_dir))[:64]:
        point = work_dir / entry
        if entry.startswith("stick-") and point.is_dir() and not point.is_symlink():
            log.warning("unmounting %s, left by an interrupted visit", point)
            unmount(point)
            with contextlib.suppress(OSError):
                os.rmdir(point)


def _open_root(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MediaError(f"{path}: cannot open: {e.strerror}") from None


def _mount(device: Path, point: Path, fstype: str, fuse: bool) -> None:
    if fuse:
        argv = [FUSE_DRIVERS[fstype], "-o", OPTIONS, str(device), str(point)]
    else:
        argv = ["mount", "-t", fstype, "-o", OPTIONS, str(device), str(point)]
    result = _run(argv)
    if result.returncode != 0 or not os.path.ismount(point):
        unmount(point)  # a FUSE driver may have mounted and then failed
        raise MediaError(f"{device}: cannot mount {fstype} read-only: {_tool_error(result)}")
    log.info("mounted %s (%s%s) read-only at %s", device, fstype, ", FUSE" if fuse else "", point)


def unmount(point: Path) -> None:
    """Unmount `point`; lazily when the plain unmount fails (a pulled stick)."""
    if not os.path.ismount(point):
        return
    result = _run(["umount", str(point)])
    if result.returncode != 0 and os.path.ismount(point):
        log.warning("unmount of %s failed (%s); detaching it lazily", point, _tool_error(result))
        _run(["umount", "-l", str(point)])
    if os.path.ismount(point):
        log.error("%s is still mounted", point)


@contextlib.contextmanager
def writable(m: Medium) -> Iterator[tuple[int | None, str]]:
    """A descriptor of the medium's root on a read-write mount, or None and why
    not. Call with no bundle descriptor open."""
    if m.device is None:
        try:
            read_only = bool(os.fstatvfs(m.root_fd).f_flag & os.ST_RDONLY)
        except OSError as e:
            yield None, f"cannot tell whether {m.root} is writable: {e.strerror}"
            return
        yield (None, f"{m.root} is mounted read-only") if read_only else (m.root_fd, "")
        return
    if m.fuse:
        yield None, f"{m.fstype} is mounted by a read-only FUSE driver (no kernel driver)"
        return
    result = _run(["mount", "-o", RW_OPTIONS, str(m.root)])
    if result.returncode != 0:
        yield None, f"the stick is read-only ({_tool_error(result)})"
        return
    try:
        fd = _open_root(m.root)
    except MediaError as e:
        yield None, str(e)
        return
    try:
        yield fd, ""
    finally:
        os.close(fd)
