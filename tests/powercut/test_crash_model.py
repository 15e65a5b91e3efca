"""The harness itself: the tracer sees every way the agent writes a file and says
when something escaped it; the replay applies the crash model (unsynced data
dropped, undurable directory entries gone, torn writes at sector granularity);
and the explorer finds the defect when an fsync is taken out of the agent."""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import agent.etcmerge
from hw.slot import IO_CHUNK, SlotWriter
from ota_common.fsutil import atomic_write, fsync_dir
from tests.powercut.conftest import Releases
from tests.powercut.explore import untraced_changes
from tests.powercut.replay import Baseline, Trace
from tests.powercut.test_power_cut_states import SCENARIOS, explorer_for
from tests.powercut.tracer import Tracer


def traced(root: Path, log: Path, action: Callable[[], object]) -> Trace:
    baseline = Baseline.take(root)
    tracer = Tracer(root, log)
    tracer.install()
    try:
        action()
    finally:
        tracer.uninstall()
    assert not tracer.unsupported
    return Trace.load(baseline, log)


def tree(trace: Trace, k: int, variant: str) -> dict[str, bytes]:
    state = trace.state(k, variant)
    assert state is not None
    return {path: trace.content(e) for path, e in state.entries if e.kind == "f"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "old.txt").write_bytes(b"old")
    return r


def test_a_file_whose_directory_entry_was_never_synced_vanishes_though_its_data_was(root: Path, tmp_path: Path) -> None:
    def create() -> None:
        fd = os.open(root / "sub" / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"acknowledged")
        os.fsync(fd)
        os.close(fd)

    trace = traced(root, tmp_path / "log", create)
    end = len(trace.ops)
    assert "sub/new" not in tree(trace, end, "synced")
    assert tree(trace, end, "names")["sub/new"] == b"acknowledged"
    assert tree(trace, end, "all")["sub/new"] == b"acknowledged"


def test_unsynced_data_is_dropped_and_what_sigkill_leaves_keeps_it(root: Path, tmp_path: Path) -> None:
    def overwrite() -> None:
        fd = os.open(root / "old.txt", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"new")
        os.close(fd)

    trace = traced(root, tmp_path / "log", overwrite)
    end = len(trace.ops)
    assert tree(trace, end, "synced")["old.txt"] == b"old"
    assert tree(trace, end, "all")["old.txt"] == b"new"


def test_a_rename_without_an_fsync_of_the_file_first_can_leave_it_empty(root: Path, tmp_path: Path) -> None:
    def careless_replace() -> None:
        (root / "tmp").write_bytes(b"contents")
        os.replace(root / "tmp", root / "old.txt")
        fsync_dir(root)

    trace = traced(root, tmp_path / "log", careless_replace)
    end = len(trace.ops)
    assert tree(trace, end, "synced")["old.txt"] == b""
    assert tree(trace, end, "all")["old.txt"] == b"contents"
    # atomic_write does it right: old or new content at every cut, never empty
    trace = traced(root, tmp_path / "log2", lambda: atomic_write(root / "old.txt", b"atomic"))
    seen = {tree(trace, k, v)["old.txt"] for k in range(len(trace.ops) + 1) for v in ("synced", "names", "all")}
    assert seen == {b"contents", b"atomic"}


def test_a_torn_write_keeps_whole_sectors_up_to_its_middle(root: Path, tmp_path: Path) -> None:
    def write() -> None:
        fd = os.open(root / "old.txt", os.O_WRONLY)
        os.pwrite(fd, bytes(range(256)) * 8, 100)
        os.close(fd)

    trace = traced(root, tmp_path / "log", write)
    k = next(i + 1 for i, op in enumerate(trace.ops) if op["op"] == "write")
    assert tree(trace, k, "torn")["old.txt"] == b"old" + bytes(97) + (bytes(range(256)) * 8)[: 1024 - 100]
    assert tree(trace, k, "synced-torn")["old.txt"] == tree(trace, k, "torn")["old.txt"]


def test_every_way_the_agent_writes_files_is_traced(root: Path, tmp_path: Path) -> None:
    def everything() -> None:
        (root / "bytes").write_bytes(b"b" * 5000)
        (root / "text").write_text("text\n")
        with open(root / "log.txt", "a") as f:  # builtins.open is under test
            f.write("appended\n")
        shutil.copyfile(root / "bytes", root / "sub" / "copy")
        atomic_write(root / "sub" / "atomic", b"atomic")
        (root / "dir" / "deep").mkdir(parents=True)
        (root / "sub" / "copy").rename(root / "dir" / "deep" / "moved")
        (root / "text").unlink()
        os.truncate(root / "old.txt", 1)
        slot = root / "slot.img"
        with slot.open("wb") as f:
            f.truncate(IO_CHUNK + 8192)
        with SlotWriter(slot, "B", booted="A", booted_paths=[]) as w:
            w.write(0, b"\xff" * (IO_CHUNK + 8192))
            w.write_zeros(4096, IO_CHUNK)  # a punched hole where the filesystem can
            w.sync()

    trace = traced(root, tmp_path / "log", everything)
    assert untraced_changes(trace, root) == []
    kinds = {op["op"] for op in trace.ops}
    assert {"create", "write", "truncate", "punch", "fsync", "dirsync", "rename", "unlink", "mkdir"} <= kinds


def test_a_write_that_escapes_the_tracer_is_reported(root: Path, tmp_path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def sneaky() -> None:
        fd = os.open(root / "old.txt", os.O_WRONLY)
        libc.write(fd, b"X", 1)  # straight to libc: not an os.* call
        os.close(fd)

    trace = traced(root, tmp_path / "log", sneaky)
    assert untraced_changes(trace, root) == ["old.txt: content differs from the traced writes"]


@pytest.mark.parametrize("missing", ["ota_common.fsutil:fsync_dir", "hw.slot:SlotWriter.sync"])
def test_the_explorer_finds_the_defect_when_an_fsync_is_missing(
    tmp_path: Path, releases: Releases, missing: str
) -> None:
    explorer = explorer_for(tmp_path, releases, SCENARIOS["install"], "sim", installs=0,
                            tracer_args=("--without", missing))
    result = explorer.explore(explorer.trace(tmp_path / "trace"))
    assert result.failures, f"no failing state without {missing}"


def _dirs(trace: Trace, k: int, variant: str) -> set[str]:
    state = trace.state(k, variant)
    assert state is not None
    return {path for path, e in state.entries if e.kind == "d"}


def test_a_directory_rename_is_durable_only_after_its_parent_is_fsynced(root: Path, tmp_path: Path) -> None:
    (root / "sub" / "inner").write_bytes(b"inner")
    fsync_dir(root / "sub")

    def rename_dir() -> None:
        os.rename(root / "sub", root / "moved")
        fsync_dir(root)

    trace = traced(root, tmp_path / "log", rename_dir)
    rename_at = next(i for i, op in enumerate(trace.ops) if op["op"] == "rename")
    before_sync = rename_at + 1
    assert tree(trace, before_sync, "synced")["sub/inner"] == b"inner"  # the whole subtree kept its old name
    assert "moved/inner" not in tree(trace, before_sync, "synced")
    assert tree(trace, before_sync, "names")["moved/inner"] == b"inner"
    end = len(trace.ops)
    assert tree(trace, end, "synced") == {"old.txt": b"old", "moved/inner": b"inner"}
    assert _dirs(trace, end, "synced") == {"moved"}


def test_an_exchange_of_two_directories_leaves_one_or_the_other_never_a_mix(root: Path, tmp_path: Path) -> None:
    for name, body in (("etc", b"old"), ("staging", b"new")):
        (root / name / "d").mkdir(parents=True)
        (root / name / "a.conf").write_bytes(body + b"-a")
        (root / name / "d" / "b.conf").write_bytes(body + b"-b")
    os.sync()

    def swap() -> None:  # looked up at call time: the tracer replaces it (renameat2 through ctypes)
        agent.etcmerge._exchange(str(root / "staging"), str(root / "etc"))
        fsync_dir(root)

    trace = traced(root, tmp_path / "log", swap)
    assert [op["op"] for op in trace.ops] == ["exchange", "dirsync"]
    seen = set()
    for k in range(len(trace.ops) + 1):
        for variant in ("synced", "names", "all"):
            t = tree(trace, k, variant)
            etc = (t["etc/a.conf"], t["etc/d/b.conf"])
            assert etc in {(b"old-a", b"old-b"), (b"new-a", b"new-b")}
            assert (t["staging/a.conf"], t["staging/d/b.conf"]) != etc
            seen.add((k, variant, etc[0]))
    assert (1, "synced", b"old-a") in seen
    assert (1, "names", b"new-a") in seen
    assert (2, "synced", b"new-a") in seen


def test_mkdir_and_rmdir_need_their_parent_synced_and_take_their_subtree(root: Path, tmp_path: Path) -> None:
    def dirs() -> None:
        os.mkdir(root / "made")
        fd = os.open(root / "made" / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x")
        os.fsync(fd)
        os.close(fd)
        fsync_dir(root / "made")  # the file is in its directory, the directory not yet in its parent
        os.rmdir(root / "sub")

    trace = traced(root, tmp_path / "log", dirs)
    end = len(trace.ops)
    assert "made" not in _dirs(trace, end, "synced")
    assert "made/f" not in tree(trace, end, "synced")
    assert "sub" in _dirs(trace, end, "synced")
    assert _dirs(trace, end, "names") == {"made"}
    assert tree(trace, end, "names")["made/f"] == b"x"


def test_a_chmod_survives_only_once_its_inode_is_fsynced(root: Path, tmp_path: Path) -> None:
    def chmod() -> None:
        os.chmod(root / "old.txt", 0o640)
        fd = os.open(root / "old.txt", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.chmod(root / "sub", 0o700)
        os.symlink("old.txt", root / "link")
        fsync_dir(root)

    trace = traced(root, tmp_path / "log", chmod)
    modes = {k: {p: e.mode for p, e in s.entries}
             for k in (1, len(trace.ops)) if (s := trace.state(k, "synced")) is not None}
    assert modes[1]["old.txt"] != 0o640
    assert modes[len(trace.ops)]["old.txt"] == 0o640
    assert modes[len(trace.ops)]["sub"] != 0o700  # never fsynced
    final = trace.state(len(trace.ops), "synced")
    assert final is not None
    assert dict(final.entries)["link"].target == "old.txt"
    assert untraced_changes(trace, root) == []
