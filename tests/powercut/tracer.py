"""Records every durable file operation a process makes under one directory tree,
in order, so `tests.powercut.replay` can rebuild what a power cut would leave.

Tracing is at the Python level: the `os` functions that create, write, truncate,
sync, rename or remove files (`os.open` with its flags, `os.write`/`pwrite`/
`writev`/`pwritev`, `sendfile`/`copy_file_range`, `ftruncate`/`truncate`,
`posix_fallocate`, `fsync`/`fdatasync`/`sync`, `rename`/`replace` (of files
and directories), `unlink`/`remove`, `mkdir`/`rmdir`, `symlink`, `chmod`/
`fchmod`), `open`/`io.open` in any writing mode (files opened that way write
through a traced raw file, so `Path.write_bytes`, `shutil` and friends are
traced too), and the two calls the agent makes through ctypes: libc
`fallocate` as `hw.slot` calls it (hole punching) and renameat2
RENAME_EXCHANGE as `agent.etcmerge._exchange` calls it. Every function looks
its callee up at call time, so replacing the module attributes catches every
caller. Hard links created under the tree are recorded as unsupported, which
fails the replay. A directory fsync is logged under the directory's path at
the time of the fsync (from /proc/self/fd), so a directory renamed while open
is still named right.

The log (`ops.jsonl` plus `data.bin` for written bytes) names files by a logical
inode: ``b:<path>`` for a file that existed when tracing started, ``n<k>`` for
the k-th file created since. `ack` records mark reports the agent's event log
acknowledged (the harness checks none of them is lost after a power cut).
Nothing here knows the agent's file names.
"""

from __future__ import annotations

import builtins
import io
import json
import locale
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agent.etcmerge
import hw.slot

OPS = "ops.jsonl"
DATA = "data.bin"

_O_WRITE = os.O_WRONLY | os.O_RDWR


@dataclass
class _Fd:
    ino: str | None  # None: a directory
    path: str  # relative path at open time
    append: bool


class Tracer:
    """`install()` patches, `uninstall()` restores; the log is written as it happens
    (unbuffered), so a crash of the traced process keeps everything before it."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root = os.path.realpath(root)
        self.log_dir = log_dir
        self._lock = threading.RLock()
        self._real: dict[str, Any] = {}
        self._fds: dict[int, _Fd] = {}
        self._inodes: dict[tuple[int, int], str] = {}
        self._created = 0
        self._data_len = 0
        self.unsupported: list[str] = []

    # -- log ------------------------------------------------------------------

    def _log(self, record: dict[str, Any], data: bytes | None = None) -> None:
        with self._lock:
            if data is not None:
                record["blob"] = self._data_len
                record["len"] = len(data)
                self._write_all(self._data_fd, data)
                self._data_len += len(data)
            self._write_all(self._ops_fd, json.dumps(record, sort_keys=True).encode() + b"\n")

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._real["write"](fd, view) :]

    def ack(self, event: dict[str, Any]) -> None:
        self._log({"op": "ack", "event": event})

    # -- paths and inodes ----------------------------------------------------------

    def _rel(self, path: Any, dir_fd: int | None = None) -> str | None:
        """The path relative to the root, or None when outside it. The last
        component is not resolved (a rename or unlink acts on the link itself)."""
        raw = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(raw):
            raw = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), raw)
        full = os.path.abspath(raw)
        head, tail = os.path.split(full)
        full = os.path.join(os.path.realpath(head), tail) if tail else os.path.realpath(head)
        if full == self.root:
            return "."
        if not full.startswith(self.root + os.sep):
            return None
        return os.path.relpath(full, self.root)

    def _ino_of_fd(self, fd: int) -> str:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key not in self._inodes:
            self.unsupported.append(f"write to an inode that appeared without a traced create (fd {fd})")
            self._log({"op": "unsupported", "what": f"untracked inode on fd {fd}"})
            self._inodes[key] = f"u{st.st_ino}"
        return self._inodes[key]

    def _scan(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames + dirnames:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode):
                    self._inodes[(st.st_dev, st.st_ino)] = "b:" + os.path.relpath(full, self.root)

    # -- install ----------------------------------------------------------------

    def install(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ops_fd = os.open(self.log_dir / OPS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._data_fd = os.open(self.log_dir / DATA, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._scan()
        wrappers: dict[str, Callable[..., Any]] = {
            "open": self._open,
            "close": self._close,
            "write": self._write,
            "pwrite": self._pwrite,
            "writev": self._writev,
            "pwritev": self._pwritev,
            "sendfile": self._sendfile,
            "copy_file_range": self._copy_file_range,
            "ftruncate": self._ftruncate,
            "truncate": self._truncate,
            "posix_fallocate": self._posix_fallocate,
            "fsync": self._fsync,
            "fdatasync": self._fsync,
            "sync": self._sync,
            "rename": self._rename("rename"),
            "replace": self._rename("replace"),
            "unlink": self._unlink("unlink"),
            "remove": self._unlink("remove"),
            "mkdir": self._mkdir,
            "rmdir": self._rmdir,
            "link": self._unsupported("link"),
            "symlink": self._symlink,
            "chmod": self._chmod,
            "fchmod": self._fchmod,
            "dup": self._dup,
        }
        for name, fn in wrappers.items():
            if hasattr(os, name):
                self._real[name] = getattr(os, name)
                setattr(os, name, fn)
        self._real["io.open"] = io.open
        io.open = builtins.open = self._io_open
        self._patch_fallocate()
        self._patch_exchange()

    def uninstall(self) -> None:
        hw_slot = self._real.pop("hw.slot._fallocate", None)
        if hw_slot is not None:
            hw.slot._fallocate = hw_slot
        exchange = self._real.pop("agent.etcmerge._exchange", None)
        if exchange is not None:
            agent.etcmerge._exchange = exchange
        io.open = builtins.open = self._real.pop("io.open")
        for name, fn in self._real.items():
            setattr(os, name, fn)
        os.close(self._ops_fd)
        os.close(self._data_fd)
        self._real.clear()

    def _patch_fallocate(self) -> None:
        real = getattr(hw.slot, "_fallocate", None)
        if real is None:
            return
        self._real["hw.slot._fallocate"] = real
        punch = getattr(hw.slot, "FALLOC_FL_PUNCH_HOLE", 0x02)
        keep = getattr(hw.slot, "FALLOC_FL_KEEP_SIZE", 0x01)

        def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
            with self._lock:
                info = self._fds.get(fd)
                rc: int = real(fd, mode, offset, length)
                if rc == 0 and info is not None and info.ino is not None:
                    if mode & punch:
                        self._log({"op": "punch", "ino": info.ino, "off": offset, "n": length})
                    elif not mode & keep:
                        self._grow(fd, info.ino)
                return rc

        hw.slot._fallocate = fallocate

    def _patch_exchange(self) -> None:
        real = agent.etcmerge._exchange
        self._real["agent.etcmerge._exchange"] = real

        def exchange(a: str, b: str) -> None:
            with self._lock:
                ra, rb = self._rel(a), self._rel(b)
                real(a, b)
                if ra is None and rb is None:
                    return
                if ra is None or rb is None:
                    self.unsupported.append(f"exchange across the traced tree: {a} <-> {b}")
                    self._log({"op": "unsupported", "what": f"exchange {a} <-> {b}"})
                    return
                self._log({"op": "exchange", "src": ra, "dst": rb})

        agent.etcmerge._exchange = exchange

    # -- os wrappers ----------------------------------------------------------------

    def _open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        real = self._real["open"]
        with self._lock:
            rel = self._rel(path, dir_fd) if not isinstance(path, int) else None
            if rel is None:
                fd: int = real(path, flags, mode, dir_fd=dir_fd)
                return fd
            existed = os.path.lexists(os.path.join(self.root, rel))
            fd = real(path, flags, mode, dir_fd=dir_fd)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                self._fds[fd] = _Fd(None, rel, False)
                return fd
            if not stat.S_ISREG(st.st_mode):
                return fd  # a FIFO or device under the tree is not a durable file
            key = (st.st_dev, st.st_ino)
            if not existed and flags & os.O_CREAT:
                self._created += 1
                ino = f"n{self._created}"
                self._inodes[key] = ino
                self._log({"op": "create", "path": rel, "ino": ino, "mode": stat.S_IMODE(st.st_mode)})
            else:
                ino = self._ino_of_fd(fd)
            if flags & os.O_TRUNC and flags & _O_WRITE:
                self._log({"op": "truncate", "ino": ino, "size": 0})
            self._fds[fd] = _Fd(ino, rel, bool(flags & os.O_APPEND))
            return fd

    def _close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
            self._real["close"](fd)

    def _dup(self, fd: int) -> int:
        with self._lock:
            new: int = self._real["dup"](fd)
            if fd in self._fds:
                self._fds[new] = self._fds[fd]
            return new

    def _file(self, fd: int) -> _Fd | None:
        info = self._fds.get(fd)
        return info if info is not None and info.ino is not None else None

    def _offset(self, fd: int, info: _Fd) -> int:
        return os.fstat(fd).st_size if info.append else os.lseek(fd, 0, os.SEEK_CUR)

    def _write(self, fd: int, data: Any) -> int:
        with self._lock:
            info = self._file(fd)
            if info is None:
                n: int = self._real["write"](fd, data)
                return n
            offset = self._offset(fd, info)
            n = self._real["write"](fd, data)
            self._log({"op": "write", "ino": info.ino, "off": offset}, bytes(memoryview(data)[:n]))
            return n

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        with self._lock:
            n: int = self._real["pwrite"](fd, data, offset)
            info = self._file(fd)
            if info is not None:
                self._log({"op": "write", "ino": info.ino, "off": offset}, bytes(memoryview(data)[:n]))
            return n

    def _writev(self, fd: int, buffers: Any) -> int:
        with self._lock:
            info = self._file(fd)
            data = b"".join(bytes(b) for b in buffers)
            offset = self._offset(fd, info) if info is not None else 0
            n: int = self._real["writev"](fd, [data])
            if info is not None:
                self._log({"op": "write", "ino": info.ino, "off": offset}, data[:n])
            return n

    def _pwritev(self, fd: int, buffers: Any, offset: int, *flags: int) -> int:
        with self._lock:
            data = b"".join(bytes(b) for b in buffers)
            n: int = self._real["pwritev"](fd, [data], offset, *flags)
            info = self._file(fd)
            if info is not None:
                self._log({"op": "write", "ino": info.ino, "off": offset}, data[:n])
            return n

    def _copied(self, out_fd: int, in_fd: int, in_off: int | None, count: int, call: Callable[[], int]) -> int:
        with self._lock:
            info = self._file(out_fd)
            if info is None:
                return call()
            src = in_off if in_off is not None else os.lseek(in_fd, 0, os.SEEK_CUR)
            data = os.pread(in_fd, count, src)
            offset = self._offset(out_fd, info)
            n = call()
            self._log({"op": "write", "ino": info.ino, "off": offset}, data[:n])
            return n

    def _sendfile(self, out_fd: int, in_fd: int, offset: int | None, count: int, *args: Any, **kw: Any) -> int:
        real = self._real["sendfile"]
        return self._copied(out_fd, in_fd, offset, count, lambda: int(real(out_fd, in_fd, offset, count, *args, **kw)))

    def _copy_file_range(
        self, src: int, dst: int, count: int, offset_src: int | None = None, offset_dst: int | None = None
    ) -> int:
        real = self._real["copy_file_range"]
        if offset_dst is not None:  # positioned output: not what shutil does
            self.unsupported.append("copy_file_range with an output offset")
        return self._copied(dst, src, offset_src, count, lambda: int(real(src, dst, count, offset_src, offset_dst)))

    def _ftruncate(self, fd: int, length: int) -> None:
        with self._lock:
            self._real["ftruncate"](fd, length)
            info = self._file(fd)
            if info is not None:
                self._log({"op": "truncate", "ino": info.ino, "size": length})

    def _truncate(self, path: Any, length: int) -> None:
        if isinstance(path, int):
            self._ftruncate(path, length)
            return
        with self._lock:
            self._real["truncate"](path, length)
            if self._rel(path) is not None:
                st = os.stat(path)
                ino = self._inodes.get((st.st_dev, st.st_ino))
                if ino is None:
                    self.unsupported.append(f"truncate of an untracked file {path}")
                else:
                    self._log({"op": "truncate", "ino": ino, "size": length})

    def _grow(self, fd: int, ino: str) -> None:
        self._log({"op": "truncate", "ino": ino, "size": os.fstat(fd).st_size})

    def _posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        with self._lock:
            self._real["posix_fallocate"](fd, offset, length)
            info = self._file(fd)
            if info is not None and info.ino is not None:
                self._grow(fd, info.ino)

    def _fsync(self, fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        with self._lock:
            self._real["fsync"](fd)
            info = self._fds.get(fd)
            if info is None:
                return
            if info.ino is None:
                now = self._rel(os.readlink(f"/proc/self/fd/{fd}"))
                self._log({"op": "dirsync", "path": now if now is not None else info.path})
            else:
                self._log({"op": "fsync", "ino": info.ino})

    def _sync(self) -> None:
        with self._lock:
            self._real["sync"]()
            self._log({"op": "sync"})

    def _rename(self, name: str) -> Callable[..., None]:
        def rename(src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
            with self._lock:
                a, b = self._rel(src, src_dir_fd), self._rel(dst, dst_dir_fd)
                self._real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
                if a is None and b is None:
                    return
                if a is None or b is None:
                    self.unsupported.append(f"rename across the traced tree: {src} -> {dst}")
                    self._log({"op": "unsupported", "what": f"rename {src} -> {dst}"})
                    return
                self._log({"op": "rename", "src": a, "dst": b})

        return rename

    def _unlink(self, name: str) -> Callable[..., None]:
        def unlink(path: Any, *, dir_fd: int | None = None) -> None:
            with self._lock:
                rel = self._rel(path, dir_fd)
                self._real[name](path, dir_fd=dir_fd)
                if rel is not None:
                    self._log({"op": "unlink", "path": rel})

        return unlink

    def _mkdir(self, path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        with self._lock:
            rel = self._rel(path, dir_fd)
            self._real["mkdir"](path, mode, dir_fd=dir_fd)
            if rel is not None:
                got = stat.S_IMODE(os.stat(os.path.join(self.root, rel)).st_mode)
                self._log({"op": "mkdir", "path": rel, "mode": got})

    def _rmdir(self, path: Any, *, dir_fd: int | None = None) -> None:
        with self._lock:
            rel = self._rel(path, dir_fd)
            self._real["rmdir"](path, dir_fd=dir_fd)
            if rel is not None:
                self._log({"op": "rmdir", "path": rel})

    def _symlink(self, src: Any, dst: Any, target_is_directory: bool = False, *, dir_fd: int | None = None) -> None:
        with self._lock:
            rel = self._rel(dst, dir_fd)
            self._real["symlink"](src, dst, target_is_directory, dir_fd=dir_fd)
            if rel is not None:
                self._log({"op": "symlink", "path": rel, "target": os.fsdecode(src)})

    def _chmod(self, path: Any, mode: int, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> None:
        if isinstance(path, int):
            self._fchmod(path, mode)
            return
        with self._lock:
            self._real["chmod"](path, mode, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
            rel = self._rel(path, dir_fd)
            if rel is None:
                return
            full = os.path.join(self.root, rel)
            if os.path.islink(full):
                if follow_symlinks:
                    self.unsupported.append(f"chmod through a symlink {path}")
                return  # a symlink's own mode means nothing on Linux
            self._log({"op": "chmod", "path": rel, "mode": stat.S_IMODE(mode)})

    def _fchmod(self, fd: int, mode: int) -> None:
        with self._lock:
            self._real["fchmod"](fd, mode)
            info = self._fds.get(fd)
            if info is None:
                return
            if info.ino is None:
                now = self._rel(os.readlink(f"/proc/self/fd/{fd}"))
                self._log({"op": "chmod", "path": now if now is not None else info.path, "mode": stat.S_IMODE(mode)})
            else:
                self._log({"op": "chmod", "ino": info.ino, "mode": stat.S_IMODE(mode)})

    def _unsupported(self, name: str) -> Callable[..., None]:
        def call(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
            self._real[name](src, dst, *args, **kw)
            if self._rel(dst) is not None:
                self.unsupported.append(f"{name} {src} -> {dst}")
                self._log({"op": "unsupported", "what": f"{name} {dst}"})

        return call

    # -- open() in a writing mode ------------------------------------------------------

    def _io_open(self, file: Any, mode: str = "r", buffering: int = -1, encoding: str | None = None,
                 errors: str | None = None, newline: str | None = None, closefd: bool = True,
                 opener: Callable[[str, int], int] | None = None) -> Any:
        real = self._real["io.open"]
        writing = any(c in mode for c in "wax+")
        traced = writing and (self._file(file) is not None if isinstance(file, int) else self._rel(file) is not None)
        if not traced:
            return real(file, mode, buffering, encoding, errors, newline, closefd, opener)
        if isinstance(file, int):
            fd = file
        else:
            flags = _flags(mode) | os.O_CLOEXEC
            fd = opener(os.fspath(file), flags) if opener is not None else self._open(file, flags, 0o666)
        raw = _TracedRaw(fd, file, mode, closefd, self)
        if "a" in mode:
            os.lseek(fd, 0, os.SEEK_END)
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("can't have unbuffered text I/O")
            return raw
        size = io.DEFAULT_BUFFER_SIZE if buffering in (-1, 1) else buffering
        buffered: io.BufferedIOBase
        if "+" in mode:
            buffered = io.BufferedRandom(raw, size)
        elif "r" in mode:
            buffered = io.BufferedReader(raw, size)
        else:
            buffered = io.BufferedWriter(raw, size)
        if "b" in mode:
            return buffered
        enc = encoding or locale.getpreferredencoding(False)
        return io.TextIOWrapper(buffered, enc, errors, newline, line_buffering=buffering == 1)


def _flags(mode: str) -> int:
    plus = "+" in mode
    access = os.O_RDWR if plus else os.O_WRONLY
    if "w" in mode:
        return access | os.O_CREAT | os.O_TRUNC
    if "a" in mode:
        return access | os.O_CREAT | os.O_APPEND
    if "x" in mode:
        return access | os.O_CREAT | os.O_EXCL
    return os.O_RDWR if plus else os.O_RDONLY


class _TracedRaw(io.RawIOBase):
    """A raw file whose writes, truncations and close go through the traced `os` calls."""

    def __init__(self, fd: int, name: Any, mode: str, closefd: bool, tracer: Tracer) -> None:
        super().__init__()
        self._fd = fd
        self.name = name
        self.mode = mode
        self._closefd = closefd
        self._tracer = tracer

    def fileno(self) -> int:
        return self._fd

    def readable(self) -> bool:
        return "r" in self.mode or "+" in self.mode

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = os.read(self._fd, len(b))
        b[: len(data)] = data
        return len(data)

    def write(self, b: Any) -> int:
        return self._tracer._write(self._fd, b)

    def seek(self, pos: int, whence: int = 0) -> int:
        return os.lseek(self._fd, pos, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else size
        self._tracer._ftruncate(self._fd, size)
        return size

    def close(self) -> None:
        if not self.closed:
            try:
                super().close()
            finally:
                if self._closefd:
                    self._tracer._close(self._fd)
