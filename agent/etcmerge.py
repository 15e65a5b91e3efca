"""/etc kept across updates: a three-way merge, as OSTree and bootc do it.

Inputs are three directory trees: OLD, the /etc the booted image shipped (its
pristine copy, `[etc] old`, e.g. /usr/share/factory/etc); CURRENT, the
device's live /etc; NEW, the /etc of the image just written (its factory copy
when it has one, else its /etc). The result replaces the /etc of the new slot.

Per path (entries compared by type, mode, owner and content, never through
a symlink), under the policy `[etc.paths]` gives it (the longest pattern
matching the path or one of its parents; default `merge`):
- `keep`: the device's version (or its absence) whatever the images did;
- `replace`: the new image's version;
- `merge`: unchanged locally -> the new image's version (new defaults arrive,
  files the image dropped go); unchanged in the images -> the device's version
  (local edits win, local deletions stay deleted); the same change on both
  sides -> it; otherwise a conflict: both changed, type changed (file vs
  directory, symlink vs file), deleted on one side and changed on the other.
  Paths under a directory the result does not keep (replaced by a file or
  deleted locally) that the new image changes are conflicts too.
Conflicts are never silent: `MergeResult.conflicts` lists them and
`[etc] on_conflict` decides: `fail` (default: the install fails before the
switch; the booted slot stays primary), `keep-local` or `take-new`.

`plan()` is pure (scanned trees in, decisions out). `write()` builds the
merged tree beside the target /etc, fsyncs every file and directory, and
swaps it in with one renameat2(RENAME_EXCHANGE), so a power cut leaves the old
or the merged /etc in the slot, never a mix; leftovers of a cut build are
removed on the next run. `merge_into_slot()` does it on a directory tree
(tests) or on a slot it mounts (ext4 on a loop device or a partition).

Entries carry their extended attributes (all namespaces the kernel lets the
agent read: user, trusted and security as root), compared with the rest of the
entry, so an xattr change follows the same three-way rule as a mode change;
the chosen side's xattrs are written with it (SELinux labels excepted: they
follow the path and the policy). Hardlinks are kept: paths the chosen side
holds as one inode are written as one inode (the first copied, the others
linked to it), so a hardlink group stays a group wherever the result takes
all its paths from one side.

A read-only image (erofs, squashfs: recognised by their superblock magic
before anything is mounted, or a tree on a read-only mount) cannot take a
merged /etc: the install fails before the switch naming the filesystem and
pointing at the alternative, /etc on a data or overlay partition
(docs/containers.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fnmatch
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.crashpoint import crashpoint
from agent.errors import InstallError
from agent.events import MAX_CONFLICTS, EtcConflict

MAX_ENTRIES = 100_000
MAX_XATTR_BYTES = 64 << 10  # an entry's extended attributes, names and values together
# SELinux labels follow the path and the policy (restorecon), not the image or the device: the
# factory copy under /usr carries other labels than /etc, so comparing them would make every file
# look changed locally. They are neither compared nor copied; the policy labels the merged tree.
IGNORED_XATTRS = frozenset({"security.selinux"})
STAGING = ".etc-merge-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class Policy(enum.Enum):
    KEEP = "keep"
    REPLACE = "replace"
    MERGE = "merge"


class OnConflict(enum.Enum):
    FAIL = "fail"
    KEEP_LOCAL = "keep-local"
    TAKE_NEW = "take-new"


@dataclass(frozen=True, slots=True)
class EtcConfig:
    """`[etc]` (docs/config.md)."""

    merge: bool = False
    old: Path = Path("/usr/share/factory/etc")
    current: Path = Path("/etc")
    slot_class: str = "rootfs"
    slot_etc: str = "etc"
    slot_factory: str = "usr/share/factory/etc"
    on_conflict: OnConflict = OnConflict.FAIL
    paths: tuple[tuple[str, Policy], ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # file | dir | symlink | fifo | chr | blk | socket
    mode: int
    uid: int
    gid: int
    content: str  # file: sha256; symlink: target; device: major:minor
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted by name
    inode: tuple[int, int] | None = field(default=None, compare=False)  # (dev, ino) of a hardlinked file

    def describe(self) -> str:
        return {"file": "a file", "dir": "a directory", "symlink": "a symlink"}.get(self.kind, f"a {self.kind}")


Tree = dict[tuple[str, ...], Entry]


@dataclass(frozen=True, slots=True)
class Conflict:
    path: str
    kind: str  # both-changed | type-changed | deleted-locally | deleted-in-new | under-local-change
    detail: str
    outcome: str = ""  # what [etc] on_conflict made of it: failed | kept-local | took-new

    def __str__(self) -> str:
        return f"{self.path} ({self.detail})"


@dataclass(frozen=True, slots=True)
class Pick:
    side: str  # "current" | "new"
    entry: Entry


@dataclass
class MergePlan:
    result: dict[tuple[str, ...], Pick] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    from_new: int = 0
    kept_local: int = 0


@dataclass(frozen=True, slots=True)
class MergeResult:
    entries: int
    from_new: int
    kept_local: int
    conflicts: tuple[Conflict, ...]

    def reported(self) -> tuple[EtcConflict, ...]:
        """The conflicts as the install result, the state and the reports carry them."""
        return tuple(EtcConflict(c.path, c.kind, c.outcome, c.detail) for c in self.conflicts[:MAX_CONFLICTS])

    def summary(self) -> str:
        text = f"/etc merged: {self.entries} entries, {self.from_new} from the new image, {self.kept_local} kept local"
        if self.conflicts:
            text += f"; {len(self.conflicts)} conflicts resolved by policy: " + ", ".join(map(str, self.conflicts[:10]))
        return text


# --- scanning ----------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "chr"),
        (stat.S_ISBLK, "blk"),
    ):
        if test(mode):
            return name
    return "socket"


def _digest(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    """Every extended attribute of `path` (not followed), sorted; none where unsupported."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    out = []
    size = 0
    for name in sorted(set(names) - IGNORED_XATTRS):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise
        size += len(name) + len(value)
        if size > MAX_XATTR_BYTES:
            raise InstallError(f"/etc merge: {path} has more than {MAX_XATTR_BYTES} bytes of extended attributes")
        out.append((name, value))
    return tuple(out)


def scan(root: Path) -> Tree:
    """Every entry under `root` (not `root` itself), by lstat: symlinks are
    entries, never followed. A missing root is an empty tree."""
    tree: Tree = {}
    if not root.is_dir():
        return tree
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = _kind(st.st_mode)
            if kind == "file":
                content = _digest(p)
            elif kind == "symlink":
                content = os.readlink(p)
            elif kind in ("chr", "blk"):
                content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                content = ""
            inode = (st.st_dev, st.st_ino) if kind == "file" and st.st_nlink > 1 else None
            mode = stat.S_IMODE(st.st_mode)
            tree[(*rel, name)] = Entry(kind, mode, st.st_uid, st.st_gid, content, _xattrs(p), inode)
            if len(tree) > MAX_ENTRIES:
                raise InstallError(f"/etc merge: {root} has more than {MAX_ENTRIES} entries")
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(dirpath, d))]
    return tree


# --- deciding ----------------------------------------------------------------


def policy_for(path: tuple[str, ...], rules: tuple[tuple[str, Policy], ...]) -> Policy:
    """The longest pattern that matches the path or one of its parents."""
    best: tuple[int, Policy] | None = None
    for i in range(len(path), 0, -1):
        text = "/".join(path[:i])
        for pattern, pol in rules:
            if fnmatch.fnmatchcase(text, pattern.strip("/")) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), pol)
    return best[1] if best else Policy.MERGE


def _what(e: Entry | None) -> str:
    return "absent" if e is None else e.describe()


def _changed_below(base: Tree, side: Tree) -> set[tuple[str, ...]]:
    """Every directory path with something below it that differs between the two trees."""
    out: set[tuple[str, ...]] = set()
    for path in set(base) | set(side):
        if base.get(path) != side.get(path):
            out.update(path[:i] for i in range(1, len(path)))
    return out


def _is_dir(e: Entry | None) -> bool:
    return e is not None and e.kind == "dir"


def plan(old: Tree, current: Tree, new: Tree, cfg: EtcConfig) -> MergePlan:
    """A directory counts as unchanged on a side only when everything below it is too,
    wherever the result would drop that side's subtree (a file or nothing in its place):
    so a directory the image replaces by a file while the device changed something in
    it, or a directory the device replaced or deleted while the image changed what is in
    it, is a conflict, never a silent loss of either side's changes."""
    out = MergePlan()
    local_below, new_below = _changed_below(old, current), _changed_below(old, new)
    dropped: set[tuple[str, ...]] = set()  # paths the result holds no directory at
    outcome = {OnConflict.FAIL: "failed", OnConflict.KEEP_LOCAL: "kept-local"}.get(cfg.on_conflict, "took-new")
    for path in sorted(set(old) | set(current) | set(new)):
        if any(path[:i] in dropped for i in range(1, len(path))):
            continue  # below a file or an absence in the result: decided (and reported) at the parent
        o, c, n = old.get(path), current.get(path), new.get(path)
        name = "/".join(path)
        pol = policy_for(path, cfg.paths)
        conflict: Conflict | None = None
        side = "current"
        if pol is Policy.KEEP:
            side = "current"
        elif pol is Policy.REPLACE:
            side = "new"
        elif c == o:
            side = "new"
            if _is_dir(c) and not _is_dir(n) and path in local_below:
                what = "deleted in the new image" if n is None else f"{_what(n)} in the new image"
                kind = "deleted-in-new" if n is None else "type-changed"
                conflict = Conflict(name, kind, f"a directory with local changes on the device, {what}")
        elif n in (o, c):
            side = "current"
            if n == o and _is_dir(n) and not _is_dir(c) and path in new_below:
                what = _what(c).replace("absent", "deleted")
                detail = f"{what} on the device, the new image changes what is under it"
                conflict = Conflict(name, "under-local-change", detail)
        else:
            conflict = _conflict(name, o, c, n)
        if conflict is not None:
            side = "new" if cfg.on_conflict is OnConflict.TAKE_NEW else "current"
            out.conflicts.append(replace(conflict, outcome=outcome))
        chosen = n if side == "new" else c
        if not _is_dir(chosen):
            dropped.add(path)
        if chosen is not None:
            out.result[path] = Pick(side, chosen)
        if n != c:  # the sides differ here: count whose version (or absence) the result takes
            out.from_new += side == "new"
            out.kept_local += side == "current"
    return out


def _conflict(name: str, o: Entry | None, c: Entry | None, n: Entry | None) -> Conflict:
    if c is None:
        return Conflict(name, "deleted-locally", "deleted on the device, changed in the new image")
    if n is None:
        return Conflict(name, "deleted-in-new", "changed on the device, deleted in the new image")
    if c.kind != n.kind:
        return Conflict(name, "type-changed", f"{c.describe()} on the device, {n.describe()} in the new image")
    return Conflict(name, "both-changed", "changed on the device and in the new image")


# --- writing -----------------------------------------------------------------


def _fsync(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else (os.O_RDONLY | os.O_NOFOLLOW))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: str, dst: str, e: Entry) -> None:
    """Content, owner, mode and xattrs, all before the fsync that makes them durable
    (an inode change made after it can be lost in a power cut that keeps the file)."""
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(fd_in, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd_out, view) :]
            if os.geteuid() == 0:
                os.fchown(fd_out, e.uid, e.gid)
            os.fchmod(fd_out, e.mode)  # after the chown, which clears setuid and setgid bits
            for name, value in e.xattrs:  # after both (a chown clears security.capability)
                os.setxattr(fd_out, name, value)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _owner(path: str, e: Entry) -> None:
    if os.geteuid() == 0:
        os.chown(path, e.uid, e.gid, follow_symlinks=False)


def _set_xattrs(path: str, e: Entry) -> None:
    """After chown and chmod (a chown clears security.capability)."""
    for name, value in e.xattrs:
        os.setxattr(path, name, value, follow_symlinks=False)


def _exchange(a: str, b: str) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), b)


def write(merge: MergePlan, current_root: Path, new_root: Path, target: Path) -> None:
    """Build the merged tree beside `target` from the chosen sides, then swap it in."""
    parent = target.parent
    for leftover in parent.glob(STAGING + "*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a build a power cut interrupted
    staging = parent / f"{STAGING}{uuid.uuid4().hex[:8]}"
    staging.mkdir(mode=0o755)
    roots = {"current": current_root, "new": new_root}
    dirs: list[tuple[str, Entry]] = []
    linked: dict[tuple[str, int, int], str] = {}  # (side, dev, ino) -> the staging path written for it
    for path, pick in merge.result.items():  # sorted: parents before children
        src = os.path.join(roots[pick.side], *path)
        dst = os.path.join(staging, *path)
        e = pick.entry
        if e.kind == "dir":
            os.mkdir(dst, 0o700)
            dirs.append((dst, e))
            continue
        group = (pick.side, *e.inode) if e.inode is not None else None
        if group is not None and group in linked:
            os.link(linked[group], dst)  # the same inode on the chosen side: a hardlink again
            continue
        if group is not None:
            linked[group] = dst
        if e.kind == "file":
            _copy_file(src, dst, e)
            continue
        if e.kind == "symlink":
            os.symlink(e.content, dst)
        elif e.kind == "fifo":
            os.mkfifo(dst, 0o600)
        elif e.kind in ("chr", "blk"):
            major, minor = (int(x) for x in e.content.split(":"))
            os.mknod(dst, (stat.S_IFCHR if e.kind == "chr" else stat.S_IFBLK) | 0o600, os.makedev(major, minor))
        else:
            continue  # sockets belong to running programs, not to configuration
        _owner(dst, e)
        if e.kind != "symlink":
            os.chmod(dst, e.mode)
        _set_xattrs(dst, e)
    for dst, e in reversed(dirs):
        _owner(dst, e)
        os.chmod(dst, e.mode)
        _set_xattrs(dst, e)
        _fsync(dst, directory=True)
    st = os.lstat(target) if os.path.lexists(target) else None
    if st is not None and stat.S_ISDIR(st.st_mode):
        os.chmod(staging, stat.S_IMODE(st.st_mode))
        if os.geteuid() == 0:
            os.chown(staging, st.st_uid, st.st_gid)
    _fsync(str(staging), directory=True)
    crashpoint("etc-merge-before-swap")
    if st is None:
        os.rename(staging, target)
    else:
        _exchange(str(staging), str(target))
    _fsync(str(parent), directory=True)
    crashpoint("etc-merge-after-swap")
    shutil.rmtree(staging, ignore_errors=True)  # now the previous /etc
    _fsync(str(parent), directory=True)


def merge_trees(old: Path, current: Path, new_root: Path, cfg: EtcConfig) -> MergeResult:
    """The merge on a mounted or plain directory tree `new_root` (the new slot's root)."""
    target = new_root / cfg.slot_etc
    factory = new_root / cfg.slot_factory
    new = factory if cfg.slot_factory and factory.is_dir() else target
    if not old.is_dir():
        raise InstallError(f"/etc merge: the booted image's /etc defaults {old} are missing ([etc] old)")
    try:
        merge = plan(scan(old), scan(current), scan(new), cfg)
        result = MergeResult(len(merge.result), merge.from_new, merge.kept_local, tuple(merge.conflicts))
        if merge.conflicts and cfg.on_conflict is OnConflict.FAIL:
            listed = ", ".join(map(str, merge.conflicts[:10]))
            more = f" and {len(merge.conflicts) - 10} more" if len(merge.conflicts) > 10 else ""
            raise EtcConflictError(result, f"/etc merge: {len(merge.conflicts)} conflicts: {listed}{more}")
        write(merge, current, new, target)
    except OSError as e:
        raise InstallError(f"/etc merge failed: {e.strerror}: {e.filename}") from None
    return result


class EtcConflictError(InstallError):
    """The merge found conflicts and `[etc] on_conflict = "fail"`."""

    def __init__(self, result: MergeResult, message: str) -> None:
        super().__init__(message)
        self.result = result


READ_ONLY_HINT = (
    "[etc] merge needs a writable (ext4) slot: keep /etc on a data or overlay partition instead (docs/containers.md)"
)
_MAGIC = (("squashfs", 0, b"hsqs"), ("erofs", 1024, b"\xe2\xe1\xf5\xe0"))


def read_only_image(slot: Path) -> str | None:
    """The read-only filesystem a slot file or device holds (erofs, squashfs), by its
    superblock magic; None for anything else."""
    try:
        with slot.open("rb") as f:
            head = f.read(1028)
    except OSError as e:
        raise InstallError(f"/etc merge: cannot read {slot}: {e.strerror}") from None
    return next((name for name, at, magic in _MAGIC if head[at : at + len(magic)] == magic), None)


def _refuse_read_only(where: Path, slot: Path) -> None:
    if os.statvfs(where).f_flag & os.ST_RDONLY:
        raise InstallError(f"/etc merge: {slot} is mounted read-only; {READ_ONLY_HINT}")


@contextlib.contextmanager
def _mounted(slot: Path) -> Iterator[Path]:
    """A directory tree is used as it is; a file or block device is mounted read-write.
    A read-only image or mount is refused before anything is written."""
    if slot.is_dir():
        _refuse_read_only(slot, slot)
        yield slot
        return
    fs = read_only_image(slot)
    if fs is not None:
        raise InstallError(f"/etc merge: slot {slot} holds a read-only {fs} image; {READ_ONLY_HINT}")
    where = Path(tempfile.mkdtemp(prefix="edge-ota-etc-"))
    try:
        argv = ["mount", "-o", "rw" + (",loop" if slot.is_file() else ""), str(slot), str(where)]
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["mount failed"])[-1]
            raise InstallError(f"/etc merge: cannot mount {slot} read-write ({why}); {READ_ONLY_HINT}")
        try:
            _refuse_read_only(where, slot)
            yield where
        finally:
            subprocess.run(["umount", str(where)], capture_output=True, check=False)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


def merge_into_slot(slot: Path, cfg: EtcConfig) -> MergeResult:
    with _mounted(slot) as root:
        return merge_trees(cfg.old, cfg.current, root, cfg)


def merge_for_install(cfg: EtcConfig, images: list[tuple[str, Path]]) -> MergeResult | None:
    """The installer's hook, after the read-back and before the switch: merge
    into the written slot of `cfg.slot_class` (`images`: (slot class, slot path)
    of the install). None when merging is off or the bundle does not update
    that class."""
    if not cfg.merge:
        return None
    path = next((p for cls, p in images if cls == cfg.slot_class), None)
    return None if path is None else merge_into_slot(path, cfg)
