"""Container image layers applied, in order, to a staging directory tree.

Owns the layer semantics of the OCI image spec ("Image Layer Filesystem
Changeset"): entries add or replace paths; `.wh.NAME` removes NAME from the
layers below; `.wh..wh..opq` in a directory hides everything the layers below
put in it. A whiteout never hides what its own layer adds.

Each entry keeps its type (file, directory, symlink, hardlink, character or
block device, FIFO), owner, mode (setuid/setgid/sticky included), extended
attributes (PAX `SCHILY.xattr.*` records, `security.capability` included) and
mtime, clamped to the build's epoch so the result is reproducible.

Refused with `UnsafeEntry`, naming the layer and the entry: absolute paths,
`..` components, entries whose parent is a symlink or not a directory,
hardlinks to directories or to paths that do not exist. Parents are checked
with `lstat` and nothing is ever opened through a symlink, so no layer can
write outside the staging root.

Without root, entries owned by anyone but root, device nodes and xattrs the
kernel refuses cannot be kept and are refused too (the filesystem builders
map the build user's files to root).

Layer bytes are streamed: the stored blob through a digest check, the
decompressor, the diff_id check, then the tar reader, copying file contents in
1 MiB chunks; memory does not grow with the layer size. The digests are
checked when each stream ends: a mismatch fails the build, and the caller
throws the staging tree away.
"""

from __future__ import annotations

import base64
import gzip
import os
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import zstandard

from bundler.oci.blobs import CHUNK, VerifyingReader, compression_of, decompressed
from bundler.oci.errors import OciError, UnsafeEntry
from bundler.oci.source import Layer

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(slots=True)
class Stats:
    entries: int = 0
    files: int = 0
    file_bytes: int = 0
    hardlinks: int = 0
    devices: int = 0
    whiteouts: int = 0
    layers: int = 0


class _Peeked:
    """A reader that hands back `head` before reading on from `raw`."""

    def __init__(self, head: bytes, raw: VerifyingReader) -> None:
        self._head = head
        self._raw = raw

    def read(self, n: int = -1, /) -> bytes:
        if self._head:
            data, self._head = self._head[: max(n, 1)], self._head[max(n, 1) :]
            return data
        return self._raw.read(n)


@dataclass
class Stager:
    """Applies layers to `root` (an empty directory) one after the other."""

    root: Path
    epoch: int
    privileged: bool = field(default_factory=lambda: os.geteuid() == 0)
    stats: Stats = field(default_factory=Stats)
    _dir_times: dict[str, int] = field(default_factory=dict)
    _layer: str = ""
    _added: set[tuple[str, ...]] = field(default_factory=set)
    _added_dirs: set[tuple[str, ...]] = field(default_factory=set)

    # --- paths ------------------------------------------------------------

    def _parts(self, name: str) -> tuple[str, ...]:
        if name.startswith("/"):
            raise UnsafeEntry(self._layer, name, "absolute path")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise UnsafeEntry(self._layer, name, "'..' in the path")
        if "\0" in name:
            raise UnsafeEntry(self._layer, name, "NUL in the path")
        return parts

    def _path(self, parts: tuple[str, ...]) -> str:
        return os.path.join(self.root, *parts)

    def _parents(self, name: str, parts: tuple[str, ...], *, create: bool) -> None:
        """Every parent of `parts` is a real directory inside the root (created
        when missing and `create`), never a symlink."""
        for i in range(1, len(parts)):
            p = self._path(parts[:i])
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                if not create:
                    raise UnsafeEntry(self._layer, name, f"parent {'/'.join(parts[:i])!r} does not exist") from None
                os.mkdir(p, 0o755)
                self._mark_added(parts[:i])
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeEntry(self._layer, name, f"parent {'/'.join(parts[:i])!r} is a symlink")
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeEntry(self._layer, name, f"parent {'/'.join(parts[:i])!r} is not a directory")

    def _mark_added(self, parts: tuple[str, ...]) -> None:
        self._added.add(parts)
        for i in range(len(parts)):
            self._added_dirs.add(parts[:i])

    @staticmethod
    def _remove(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    # --- layers -----------------------------------------------------------

    def apply(self, layer: Layer) -> None:
        self._layer = layer.name
        self._added = set()
        self._added_dirs = set()
        self.stats.layers += 1
        what = f"layer {layer.name}"
        try:
            raw = layer.open()
        except OSError as e:
            raise OciError(f"{what}: cannot open: {e.strerror}") from None
        with raw:
            # docker archives name only the uncompressed digest (diff_id): the stored
            # bytes are then checked through it alone
            stored = VerifyingReader(raw, layer.digest, what, layer.size)
            head = stored.read(4)
            kind = compression_of(layer.media_type, head)
            plain: IO[bytes] = decompressed(_Peeked(head, stored), kind)  # type: ignore[arg-type]
            diff = VerifyingReader(plain, layer.diff_id, f"{what} (uncompressed, diff_id)")
            try:
                with tarfile.open(fileobj=diff, mode="r|", errorlevel=2) as tar:  # type: ignore[call-overload]
                    for member in tar:
                        self._entry(tar, member)
                        tar.members.clear()
                diff.finish()
                stored.finish()
            except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile) as e:
                raise OciError(f"{what}: not a readable {kind or 'tar'} layer: {e}") from None

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = m.name
        parts = self._parts(name)
        self.stats.entries += 1
        base = parts[-1] if parts else ""
        if base.startswith(WHITEOUT):
            self._parents(name, parts, create=True)
            self._whiteout(parts)
            return
        if not parts:  # the root directory itself
            if m.isdir():
                self._meta(self._path(()), m, name, is_dir=True)
            return
        self._parents(name, parts, create=True)
        path = self._path(parts)
        try:
            if m.isdir():
                try:
                    st = os.lstat(path)
                    if not stat.S_ISDIR(st.st_mode):
                        self._remove(path)
                        os.mkdir(path, 0o700)
                except FileNotFoundError:
                    os.mkdir(path, 0o700)
                self._meta(path, m, name, is_dir=True)
            elif m.isreg():
                self._remove(path)
                self._file(tar, m, path, name)
            elif m.issym():
                self._remove(path)
                os.symlink(m.linkname, path)
                self._meta(path, m, name)
            elif m.islnk():
                self._hardlink(m, path, name)
            elif m.ischr() or m.isblk() or m.isfifo():
                self._node(m, path, name)
            else:
                raise UnsafeEntry(self._layer, name, f"unsupported tar entry type {m.type!r}")
        except OSError as e:
            raise UnsafeEntry(self._layer, name, f"cannot create: {e.strerror}") from None
        self._mark_added(parts)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, path: str, name: str) -> None:
        src = tar.extractfile(m)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if src is not None:
                while data := src.read(CHUNK):
                    _write_all(fd, data)
            self._meta(fd, m, name)
        finally:
            os.close(fd)
        os.utime(path, (self._time(m), self._time(m)), follow_symlinks=False)
        self.stats.files += 1
        self.stats.file_bytes += m.size

    def _hardlink(self, m: tarfile.TarInfo, path: str, name: str) -> None:
        target = self._parts(m.linkname)
        if not target:
            raise UnsafeEntry(self._layer, name, "hardlink to the root directory")
        self._parents(name, target, create=False)
        tpath = self._path(target)
        try:
            st = os.lstat(tpath)
        except FileNotFoundError:
            raise UnsafeEntry(self._layer, name, f"hardlink target {m.linkname!r} does not exist") from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeEntry(self._layer, name, f"hardlink target {m.linkname!r} is a directory")
        if tpath == path:
            return
        self._remove(path)
        os.link(tpath, path, follow_symlinks=False)
        self.stats.hardlinks += 1

    def _node(self, m: tarfile.TarInfo, path: str, name: str) -> None:
        self._remove(path)
        if m.isfifo():
            os.mkfifo(path, 0o600)
        elif not self.privileged:
            raise UnsafeEntry(self._layer, name, "a device node needs root to create (build as root)")
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            self.stats.devices += 1
        self._meta(path, m, name)

    def _time(self, m: tarfile.TarInfo) -> int:
        return max(0, min(int(m.mtime), self.epoch))

    def _meta(self, target: str | int, m: tarfile.TarInfo, name: str, *, is_dir: bool = False) -> None:
        """Owner, then mode (a chown clears setuid), then xattrs; times of
        files here, of directories at the end (their entries change them)."""
        link = m.issym()
        nofollow = {} if isinstance(target, int) else {"follow_symlinks": False}
        if self.privileged:
            os.chown(target, m.uid, m.gid, **nofollow)
        elif m.uid != 0 or m.gid != 0:
            raise UnsafeEntry(self._layer, name, f"owner {m.uid}:{m.gid} can be kept only when building as root")
        if not link:
            os.chmod(target, stat.S_IMODE(m.mode), **nofollow)
        for key, value in _xattrs(m):
            try:
                os.setxattr(target, key, value, **nofollow)
            except OSError as e:
                raise UnsafeEntry(self._layer, name, f"cannot keep xattr {key!r}: {e.strerror}") from None
        if isinstance(target, str) and is_dir:
            self._dir_times[target] = self._time(m)
        elif isinstance(target, str):
            os.utime(target, (self._time(m), self._time(m)), follow_symlinks=False)

    def _whiteout(self, parts: tuple[str, ...]) -> None:
        self.stats.whiteouts += 1
        parent = parts[:-1]
        base = parts[-1]
        if base == OPAQUE:
            self._clear_lower(parent)
            return
        if base.startswith(WHITEOUT + WHITEOUT):  # other AUFS metadata (.wh..wh.plnk, ...): nothing to apply
            return
        hidden = (*parent, base[len(WHITEOUT) :])
        if hidden in self._added:  # a whiteout hides only what the layers below hold
            return
        self._remove(self._path(hidden))

    def _clear_lower(self, parts: tuple[str, ...]) -> None:
        """An opaque directory: remove what the layers below put in it; keep
        what this layer added (before or after the marker)."""
        path = self._path(parts)
        try:
            names = sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        for child in names:
            sub = (*parts, child)
            cpath = self._path(sub)
            if sub in self._added or sub in self._added_dirs:
                if os.path.isdir(cpath) and not os.path.islink(cpath):
                    self._clear_lower(sub)
                continue
            self._remove(cpath)

    def finish(self) -> None:
        """Directory times, deepest first (creating entries changed them)."""
        for dirpath, _dirs, _files in os.walk(self.root, topdown=False):
            t = self._dir_times.get(dirpath, self.epoch)
            os.utime(dirpath, (t, t), follow_symlinks=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """PAX xattr records: `SCHILY.xattr.NAME=VALUE` (GNU tar, Go's archive/tar,
    buildah) and `LIBARCHIVE.xattr.NAME=base64` (bsdtar), in name order."""
    out: dict[str, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                out.setdefault(name, base64.b64decode(value + "=" * (-len(value) % 4)))
            except ValueError:
                raise OciError(f"entry {m.name!r}: xattr {name!r} is not base64") from None
    return sorted(out.items())
