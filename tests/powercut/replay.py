"""Rebuilds the directory tree a power cut would leave, from a byte copy taken
before a traced operation (`Baseline`) and its op log (`tests.powercut.tracer`).

The crash model, for a cut before op k (k = 0 .. number of ops):

* data written to a file (write, truncate, punched hole) survives only if an
  fsync of that file (or a sync) followed it before k;
* a create, symlink, rename (of a file or a whole directory), renameat2
  RENAME_EXCHANGE, unlink, mkdir or rmdir survives only if its directory (both
  directories, for a rename or exchange across two) was fsynced after it before
  k, as on Linux/ext4 under the POSIX durability rules: a file created and
  never made durable in its directory vanishes, whatever was synced into it; a
  directory renamed or exchanged whose parent was not synced afterwards is
  still under its old name; a chmod survives once its inode was fsynced;
* name changes are kept in the order they were made for each inode they move
  (a later rename of a file or directory never survives an earlier one that did
  not), as a journal commits them.

Names are modelled per directory inode, not per path: every name op becomes
edits of the entries of one or two directories (resolved by replaying the
whole log in order, so a path always means what it meant when the op ran),
and a state's tree is read from the root through the directories' surviving
entries, so a directory moved, exchanged or never made durable takes its whole
subtree with it.

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
NAME_OPS = frozenset({"create", "symlink", "rename", "exchange", "unlink", "mkdir", "rmdir"})
ROOT_ID = "d:."
DATA_OPS = frozenset({"write", "truncate", "punch"})


@dataclass(frozen=True)
class Baseline:
    """Every file (bytes, mode) and directory (mode) under a root, keyed by relative path."""

    files: dict[str, tuple[bytes, int]]
    dirs: dict[str, int]
    links: dict[str, str] = field(default_factory=dict)  # symlink -> its target

    @classmethod
    def take(cls, root: Path) -> Baseline:
        files: dict[str, tuple[bytes, int]] = {}
        dirs: dict[str, int] = {}
        links: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                st = os.lstat(full)
                if stat.S_ISDIR(st.st_mode):
                    dirs[rel] = stat.S_IMODE(st.st_mode)
                elif stat.S_ISLNK(st.st_mode):
                    links[rel] = os.readlink(full)
                elif stat.S_ISREG(st.st_mode):
                    files[rel] = (Path(full).read_bytes(), stat.S_IMODE(st.st_mode))
                else:
                    raise ValueError(f"{full}: only regular files, directories and symlinks are supported")
        return cls(files, dirs, links)


@dataclass(frozen=True)
class Entry:
    kind: str  # "f" (file), "d" (directory) or "l" (symlink, to `target`)
    mode: int
    ino: str = ""
    prefix: int = 0  # how many of the inode's data ops it holds
    torn: int | None = None  # the op index of a torn last write, cut at `torn_at`
    torn_at: int = 0
    target: str = ""


Edit = tuple[str, str, str | None]  # directory node, entry name, the node it names (None: removed)


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
    _edits: dict[int, list[Edit]] = field(default_factory=dict)  # name op -> its directory edits
    _chmods: dict[int, tuple[str, int]] = field(default_factory=dict)  # chmod op -> (node, mode)
    _kinds: dict[str, str] = field(default_factory=dict)  # node -> "f" | "d" | "l"
    _modes: dict[str, int] = field(default_factory=dict)  # node -> mode when it was made
    _targets: dict[str, str] = field(default_factory=dict)  # symlink node -> target
    _children: dict[str, dict[str, str]] = field(default_factory=dict)  # baseline: directory -> entries
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
        """Resolve every name op to directory edits by replaying the log in order, and
        find for every op the index of the barrier that makes it durable (len(ops)+1:
        never). A rename or exchange touching two directories is durable once both were
        synced; a name op moving a node is never durable before the previous one that
        moved it."""
        self._baseline_nodes()
        where = {self._path_of(n): n for n in self._kinds}  # path -> node, as the real run went
        where["."] = ROOT_ID
        never = len(self.ops) + 1
        self._durable = [never] * len(self.ops)
        pending_data: dict[str, list[int]] = {}
        waiting: dict[int, set[str]] = {}  # name op or chmod -> nodes still to be synced
        moved: dict[int, list[str]] = {}  # name op -> the nodes it places
        made = 0
        for i, op in enumerate(self.ops):
            kind = op["op"]
            if kind in DATA_OPS:
                ino = op["ino"]
                self._index_in_ino[i] = len(self._ino_ops.setdefault(ino, []))
                self._ino_ops[ino].append(i)
                pending_data.setdefault(ino, []).append(i)
            elif kind in NAME_OPS:
                if kind in ("create", "mkdir", "symlink"):
                    made += 1
                    node = op["ino"] if kind == "create" else f"{'m' if kind == 'mkdir' else 's'}{made}"
                    self._kinds[node] = {"create": "f", "mkdir": "d", "symlink": "l"}[kind]
                    self._modes[node] = op.get("mode", 0o777)
                    if kind == "symlink":
                        self._targets[node] = op["target"]
                    self._edits[i] = [self._edit(where, op["path"], node)]
                    moved[i] = [node]
                    _place(where, op["path"], node)
                elif kind in ("unlink", "rmdir"):
                    self._edits[i] = [self._edit(where, op["path"], None)]
                    moved[i] = []
                    _remove(where, op["path"])
                elif kind == "rename":
                    node = _lookup(where, op["src"])
                    self._edits[i] = [self._edit(where, op["src"], None), self._edit(where, op["dst"], node)]
                    moved[i] = [node]
                    _move(where, op["src"], op["dst"])
                else:  # exchange
                    a, b = _lookup(where, op["src"]), _lookup(where, op["dst"])
                    self._edits[i] = [self._edit(where, op["src"], b), self._edit(where, op["dst"], a)]
                    moved[i] = [a, b]
                    _exchange(where, op["src"], op["dst"])
                waiting[i] = {d for d, _, _ in self._edits[i]}
            elif kind == "chmod":
                node = op["ino"] if "ino" in op else _lookup(where, op["path"])
                self._chmods[i] = (node, op["mode"])
                waiting[i] = {node}
            elif kind == "fsync":
                for j in pending_data.pop(op["ino"], []):
                    self._durable[j] = i
                self._synced(waiting, {op["ino"]}, i)
            elif kind == "dirsync":
                self._synced(waiting, {_lookup(where, op["path"])}, i)
            elif kind == "sync":
                for group in pending_data.values():
                    for j in group:
                        self._durable[j] = i
                pending_data.clear()
                self._synced(waiting, None, i)
        last: dict[str, int] = {}  # node -> when its latest name op became durable
        for i in sorted(moved):
            for node in moved[i]:
                self._durable[i] = max(self._durable[i], last.get(node, -1))
            for node in moved[i]:
                last[node] = self._durable[i]

    def _synced(self, waiting: dict[int, set[str]], nodes: set[str] | None, i: int) -> None:
        for j in list(waiting):
            if nodes is None:
                waiting[j].clear()
            else:
                waiting[j] -= nodes
            if not waiting[j]:
                self._durable[j] = i
                del waiting[j]

    def _baseline_nodes(self) -> None:
        self._kinds[ROOT_ID] = "d"
        self._modes[ROOT_ID] = 0o755
        self._children[ROOT_ID] = {}
        for p, m in self.baseline.dirs.items():
            self._kinds["d:" + p], self._modes["d:" + p] = "d", m
            self._children["d:" + p] = {}
        for p, (_, m) in self.baseline.files.items():
            self._kinds["b:" + p], self._modes["b:" + p] = "f", m
        for p, t in self.baseline.links.items():
            self._kinds["l:" + p], self._modes["l:" + p], self._targets["l:" + p] = "l", 0o777, t
        for node in list(self._kinds):
            if node != ROOT_ID:
                path = self._path_of(node)
                self._children["d:" + _parent(path) if _parent(path) != "." else ROOT_ID][os.path.basename(path)] = node

    @staticmethod
    def _path_of(node: str) -> str:
        return "." if node == ROOT_ID else node[2:]

    @staticmethod
    def _edit(where: dict[str, str], path: str, node: str | None) -> Edit:
        parent = where.get(_parent(path))
        if parent is None:
            raise ValueError(f"{path}: its directory is not in the traced tree")
        return (parent, os.path.basename(path), node)

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
        children = {d: dict(entries) for d, entries in self._children.items()}
        modes: dict[str, int] = {}
        prefix: dict[str, int] = {}
        for i in range(k):
            op = self.ops[i]
            kind = op["op"]
            if kind in NAME_OPS and (keep_names or self._durable[i] < k):
                for d, name, node in self._edits[i]:
                    entries = children.setdefault(d, {})
                    if node is None:
                        entries.pop(name, None)
                    else:
                        entries[name] = node
            elif kind == "chmod" and (keep_names or self._durable[i] < k):
                node, mode = self._chmods[i]
                modes[node] = mode
            elif kind in DATA_OPS and (keep_data or self._durable[i] < k):
                prefix[op["ino"]] = self._index_in_ino[i] + 1
        torn_op = k - 1 if torn else None
        if variant == "torn":  # everything before the torn write, which is applied in part
            prefix[self.ops[k - 1]["ino"]] = self._index_in_ino[k - 1]
        entries_out: list[tuple[str, Entry]] = []
        seen = {ROOT_ID}
        stack = [(".", ROOT_ID)]
        while stack:
            path, d = stack.pop()
            for name, node in children.get(d, {}).items():
                if node in seen:
                    continue  # a node in two places cannot be: its first place holds it
                seen.add(node)
                rel = name if path == "." else f"{path}/{name}"
                kind = self._kinds[node]
                mode = modes.get(node, self._modes[node])
                if kind == "d":
                    entries_out.append((rel, Entry("d", mode)))
                    stack.append((rel, node))
                elif kind == "l":
                    entries_out.append((rel, Entry("l", 0o777, target=self._targets[node])))
                else:
                    t = torn_op if torn_op is not None and self.ops[torn_op]["ino"] == node else None
                    at = (_tear(self.ops[t]) or 0) if t is not None else 0
                    entries_out.append((rel, Entry("f", mode, node, prefix.get(node, 0), t, at)))
        return State(k, variant, tuple(sorted(entries_out)))

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
            digest = self.content_hash(e) if e.kind == "f" else e.target
            h.update(f"{path}\0{e.kind}\0{e.mode}\0{digest}\n".encode())
        return h.hexdigest()

    def acknowledged(self, k: int) -> list[dict[str, Any]]:
        """Reports the agent's event log had acknowledged before op k."""
        return [op["event"] for op in self.ops[:k] if op["op"] == "ack"]


def _parent(path: str) -> str:
    parent = os.path.dirname(path)
    return parent or "."


def _lookup(where: dict[str, str], path: str) -> str:
    node = where.get(path)
    if node is None:
        raise ValueError(f"{path}: not in the traced tree when the op ran")
    return node


def _under(where: dict[str, str], path: str) -> list[str]:
    return [p for p in where if p == path or p.startswith(path + "/")]


def _place(where: dict[str, str], path: str, node: str) -> None:
    where[path] = node


def _remove(where: dict[str, str], path: str) -> None:
    for p in _under(where, path):
        del where[p]


def _move(where: dict[str, str], src: str, dst: str) -> None:
    if src == dst:
        return
    moving = {p: where[p] for p in _under(where, src)}
    _remove(where, src)
    _remove(where, dst)  # what the rename replaced (a file, or an empty directory)
    for p, node in moving.items():
        where[dst + p[len(src):]] = node


def _exchange(where: dict[str, str], a: str, b: str) -> None:
    at_a = {p[len(a):]: where[p] for p in _under(where, a)}
    at_b = {p[len(b):]: where[p] for p in _under(where, b)}
    _remove(where, a)
    _remove(where, b)
    for tail, node in at_b.items():
        where[a + tail] = node
    for tail, node in at_a.items():
        where[b + tail] = node


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
