"""Rebuilds the directory tree a power cut would leave, from a byte copy taken
before a traced operation (`Baseline`) and its op log (`tests.powercut.tracer`).

The crash model, for a cut before op k (k = 0 .. number of ops):

* data written to a file (write, truncate, punched hole) survives only if an
  fsync of that file (or a sync) followed it before k;
* a create, rename, unlink, mkdir or rmdir survives only if its directory was
  fsynced after it before k: a file created and never made durable in its
  directory vanishes, whatever was synced into it.

Variants per k (`VARIANTS`): ``synced`` is exactly that; ``names`` keeps every
directory change before k but only synced data (a journal that commits
metadata ahead of data: catches a rename that was not preceded by an fsync of
the file); ``all`` keeps everything before k (what SIGKILL leaves: the page
cache survives); ``torn`` and ``synced-torn`` add the first half of the last
write before k (one that spans a 512-byte sector boundary), cut at a sector
boundary, to ``all`` and ``synced``.

Within one file, synced data is always a prefix of the file's writes (an fsync
covers every write before it), so a state is named by which prefix of each
file's writes it holds; identical trees are deduplicated by their content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.powercut.tracer import DATA, OPS

SECTOR = 512
VARIANTS = ("synced", "names", "all", "torn", "synced-torn")
NAME_OPS = frozenset({"create", "rename", "unlink", "mkdir", "rmdir"})
DATA_OPS = frozenset({"write", "truncate", "punch"})


@dataclass(frozen=True)
class Baseline:
    """Every file (bytes, mode) and directory (mode) under a root, keyed by relative path."""

    files: dict[str, tuple[bytes, int]]
    dirs: dict[str, int]

    @classmethod
    def take(cls, root: Path) -> Baseline:
        files: dict[str, tuple[bytes, int]] = {}
        dirs: dict[str, int] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                full = os.path.join(dirpath, name)
                dirs[os.path.relpath(full, root)] = stat.S_IMODE(os.lstat(full).st_mode)
            for name in filenames:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if not stat.S_ISREG(st.st_mode):
                    raise ValueError(f"{full}: only regular files and directories are supported")
                files[os.path.relpath(full, root)] = (Path(full).read_bytes(), stat.S_IMODE(st.st_mode))
        return cls(files, dirs)


@dataclass(frozen=True)
class Entry:
    kind: str  # "f" or "d"
    mode: int
    ino: str = ""
    prefix: int = 0  # how many of the inode's data ops it holds
    torn: int | None = None  # the op index of a torn last write, cut at `torn_at`
    torn_at: int = 0


@dataclass(frozen=True)
class State:
    """One tree a cut can leave: path -> Entry; `cut` is the k it was built for."""

    cut: int
    variant: str
    entries: tuple[tuple[str, Entry], ...]


@dataclass
class Trace:
    baseline: Baseline
    ops: list[dict[str, Any]]
    data: bytes
    _durable: list[int] = field(default_factory=list)
    _index_in_ino: dict[int, int] = field(default_factory=dict)
    _ino_ops: dict[str, list[int]] = field(default_factory=dict)
    _modes: dict[str, int] = field(default_factory=dict)
    _content: dict[tuple[str, int], bytes] = field(default_factory=dict)
    _hashes: dict[tuple[Any, ...], str] = field(default_factory=dict)

    @classmethod
    def load(cls, baseline: Baseline, log_dir: Path) -> Trace:
        ops = [json.loads(line) for line in (log_dir / OPS).read_text().splitlines()]
        trace = cls(baseline, ops, (log_dir / DATA).read_bytes())
        trace._analyse()
        return trace

    @property
    def fs_ops(self) -> int:
        """Durable file operations traced (acknowledgement marks not counted)."""
        return sum(1 for op in self.ops if op["op"] != "ack")

    def unsupported(self) -> list[str]:
        return [op["what"] for op in self.ops if op["op"] == "unsupported"]

    def _analyse(self) -> None:
        """For every op: the index of the barrier that makes it durable (len(ops)+1: never).
        A rename touching two directories is durable once both were synced."""
        never = len(self.ops) + 1
        self._durable = [never] * len(self.ops)
        pending_data: dict[str, list[int]] = {}
        waiting: dict[int, set[str]] = {}  # name op -> directories still to be synced
        for i, op in enumerate(self.ops):
            kind = op["op"]
            if kind in DATA_OPS:
                ino = op["ino"]
                self._index_in_ino[i] = len(self._ino_ops.setdefault(ino, []))
                self._ino_ops[ino].append(i)
                pending_data.setdefault(ino, []).append(i)
            elif kind in NAME_OPS:
                if kind == "create":
                    self._modes[op["ino"]] = op["mode"]
                dirs = {_parent(op["src"]), _parent(op["dst"])} if kind == "rename" else {_parent(op["path"])}
                waiting[i] = dirs
            elif kind == "fsync":
                for j in pending_data.pop(op["ino"], []):
                    self._durable[j] = i
            elif kind in ("dirsync", "sync"):
                if kind == "sync":
                    for group in pending_data.values():
                        for j in group:
                            self._durable[j] = i
                    pending_data.clear()
                for j in list(waiting):
                    if kind == "dirsync":
                        waiting[j].discard(op["path"])
                    else:
                        waiting[j].clear()
                    if not waiting[j]:
                        self._durable[j] = i
                        del waiting[j]

    # -- states --------------------------------------------------------------

    def states(self) -> Iterator[State]:
        """Every (cut, variant) state; many are identical trees (dedupe by `tree_hash`)."""
        for k in range(len(self.ops) + 1):
            for variant in VARIANTS:
                state = self.state(k, variant)
                if state is not None:
                    yield state

    def state(self, k: int, variant: str) -> State | None:
        torn = variant in ("torn", "synced-torn")
        if torn and not (k > 0 and self.ops[k - 1]["op"] == "write" and _tear(self.ops[k - 1]) is not None):
            return None
        keep_names = variant in ("names", "all", "torn")
        keep_data = variant in ("all", "torn")
        names: dict[str, Entry] = {p: Entry("d", m) for p, m in self.baseline.dirs.items()}
        names.update({p: Entry("f", m, "b:" + p) for p, (_, m) in self.baseline.files.items()})
        prefix: dict[str, int] = {}
        for i in range(k):
            op = self.ops[i]
            kind = op["op"]
            if kind in NAME_OPS and (keep_names or self._durable[i] < k):
                _apply_name(names, op, self._modes)
            elif kind in DATA_OPS and (keep_data or self._durable[i] < k):
                prefix[op["ino"]] = self._index_in_ino[i] + 1
        torn_op = k - 1 if torn else None
        if variant == "torn":  # everything before the torn write, which is applied in part
            prefix[self.ops[k - 1]["ino"]] = self._index_in_ino[k - 1]
        entries = []
        for path, named in sorted(names.items()):
            e = named
            if e.kind == "f":
                t = torn_op if torn_op is not None and self.ops[torn_op]["ino"] == e.ino else None
                at = (_tear(self.ops[t]) or 0) if t is not None else 0
                e = Entry("f", e.mode, e.ino, prefix.get(e.ino, 0), t, at)
            entries.append((path, e))
        return State(k, variant, tuple(entries))

    def content(self, e: Entry) -> bytes:
        key = (e.ino, e.prefix)
        data = self._content.get(key)
        if data is None:
            if e.prefix == 0:
                base = self.baseline.files.get(e.ino[2:]) if e.ino.startswith("b:") else None
                data = base[0] if base is not None else b""
            else:
                buf = bytearray(self.content(Entry("f", e.mode, e.ino, e.prefix - 1)))
                _apply_data(buf, self.ops[self._ino_ops[e.ino][e.prefix - 1]], self.data)
                data = bytes(buf)
            if len(data) < (1 << 16) or e.prefix == len(self._ino_ops.get(e.ino, [])):
                self._content[key] = data
        if e.torn is not None:
            op = self.ops[e.torn]
            buf = bytearray(data)
            _apply_data(buf, {**op, "len": e.torn_at - op["off"]}, self.data)
            return bytes(buf)
        return data

    def content_hash(self, e: Entry) -> str:
        key = ("#", e.ino, e.prefix, e.torn, e.torn_at)
        cached = self._hashes.get(key)
        if cached is None:
            cached = self._hashes[key] = hashlib.sha256(self.content(e)).hexdigest()
        return cached

    def tree_hash(self, state: State) -> str:
        h = hashlib.sha256()
        for path, e in state.entries:
            digest = self.content_hash(e) if e.kind == "f" else ""
            h.update(f"{path}\0{e.kind}\0{e.mode}\0{digest}\n".encode())
        return h.hexdigest()

    def acknowledged(self, k: int) -> list[dict[str, Any]]:
        """Reports the agent's event log had acknowledged before op k."""
        return [op["event"] for op in self.ops[:k] if op["op"] == "ack"]


def _parent(path: str) -> str:
    parent = os.path.dirname(path)
    return parent or "."


def _apply_name(names: dict[str, Entry], op: dict[str, Any], modes: dict[str, int]) -> None:
    kind = op["op"]
    if kind in ("create", "mkdir"):
        if not _dir_exists(names, op["path"]):
            return  # its directory never became durable
        names[op["path"]] = Entry("f", modes[op["ino"]], op["ino"]) if kind == "create" else Entry("d", op["mode"])
    elif kind == "rename":
        moved = names.pop(op["src"], None)
        if moved is not None and moved.kind == "d":
            raise ValueError(f"directory renames are not modelled ({op['src']})")
        if moved is not None and _dir_exists(names, op["dst"]):
            names[op["dst"]] = moved
    elif kind in ("unlink", "rmdir"):
        names.pop(op["path"], None)


def _dir_exists(names: dict[str, Entry], path: str) -> bool:
    parent = _parent(path)
    return parent == "." or (parent in names and names[parent].kind == "d")


def _apply_data(buf: bytearray, op: dict[str, Any], data: bytes) -> None:
    kind = op["op"]
    if kind == "write":
        off, n = op["off"], op["len"]
        if n <= 0:
            return
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off : off + n] = data[op["blob"] : op["blob"] + n]
    elif kind == "truncate":
        size = op["size"]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
    elif kind == "punch":
        off, n = op["off"], op["n"]
        end = min(off + n, len(buf))
        if end > off:
            buf[off:end] = bytes(end - off)


def _tear(op: dict[str, Any]) -> int | None:
    """Where a write torn at sector granularity stops: the sector boundary nearest
    below its middle, else the first one inside it; None when it lies in one sector."""
    off, n = op["off"], op["len"]
    cut = (off + n // 2) // SECTOR * SECTOR
    if cut <= off:
        cut = (off // SECTOR + 1) * SECTOR
    return cut if off < cut < off + n else None
