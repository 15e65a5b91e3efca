"""The stick scan (agent.media.scan) on real directory trees: the layout
convention (top-level *.otab, edge-ota/ in any case, subdirectories down to the
depth bound, reports/ and hidden names skipped), symlinks never followed (to
files, directories or devices; also one swapped in after the scan), and every
bound (entries looked at, name length, depth, number of bundles) stopping the
scan with a line saying so."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.media.scan import Limits, ScanResult, open_candidate, scan


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "stick"


def make(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def scanned(root: Path, limits: Limits | None = None) -> ScanResult:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return scan(fd, limits or Limits())
    finally:
        os.close(fd)


def found(result: ScanResult) -> list[str]:
    return ["/".join(parts) for parts in result.candidates]


def skipped(result: ScanResult) -> dict[str, str]:
    return {i.file: i.reason for i in result.skipped}


@pytest.fixture
def root_fd(root: Path) -> Iterator[int]:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_the_layout_convention_is_what_is_found(root: Path) -> None:
    make(root, "top.otab", "TOP2.OTAB", "notes.txt", "other/x.otab", "EDGE-OTA/a.otab", "EDGE-OTA/board/b.otab",
         "EDGE-OTA/reports/r.otab", "EDGE-OTA/._a.otab", ".hidden.otab")
    result = scanned(root)
    assert found(result) == ["TOP2.OTAB", "top.otab", "EDGE-OTA/a.otab", "EDGE-OTA/board/b.otab"]
    assert result.skipped == []


def test_symlinks_to_files_directories_and_devices_are_listed_and_not_followed(root: Path, tmp_path: Path) -> None:
    make(tmp_path / "device", "own.otab", "dir/in.otab")
    root.mkdir()
    (root / "own.otab").symlink_to(tmp_path / "device" / "own.otab")
    (root / "edge-ota").symlink_to(tmp_path / "device" / "dir")
    (root / "zero.otab").symlink_to("/dev/zero")
    result = scanned(root)
    assert found(result) == []
    assert skipped(result) == {name: "a symbolic link: not followed" for name in ("edge-ota", "own.otab", "zero.otab")}


def test_a_symlink_swapped_in_after_the_scan_is_refused_on_open(root: Path, root_fd: int, tmp_path: Path) -> None:
    make(root, "edge-ota/a.otab")
    make(tmp_path, "elsewhere/a.otab")
    [parts] = scanned(root).candidates
    (root / "edge-ota").rename(root / "gone")
    (root / "edge-ota").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError, match=r"Too many levels of symbolic links|Not a directory") as e:
        open_candidate(root_fd, parts)
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_a_fifo_named_like_a_bundle_is_not_opened_as_one(root: Path, root_fd: int) -> None:
    root.mkdir(exist_ok=True)
    os.mkfifo(root / "pipe.otab")
    result = scanned(root)
    assert found(result) == []  # not a regular file: not even a candidate
    assert skipped(result) == {"pipe.otab": "not a regular file"}


def test_the_depth_bound_stops_descending_with_a_line(root: Path) -> None:
    make(root, "edge-ota/1/2/deep.otab", "edge-ota/1/ok.otab")
    result = scanned(root, Limits(depth=2))
    assert found(result) == ["edge-ota/1/ok.otab"]
    assert skipped(result) == {"edge-ota/1/2": "deeper than 2 levels: not read"}


def test_the_entry_bound_stops_the_scan_with_a_line(root: Path) -> None:
    make(root, *(f"edge-ota/f{i:03}.txt" for i in range(50)), "edge-ota/zz.otab")
    result = scanned(root, Limits(entries=20))
    assert result.truncated
    assert result.entries == 20
    assert skipped(result) == {"(scan)": "stopped after 20 directory entries"}


def test_long_names_and_bundles_past_the_count_bound_are_skipped_with_a_line(root: Path) -> None:
    make(root, "a.otab", "b.otab", "c.otab", "x" * 40 + ".otab")
    result = scanned(root, Limits(name=30, candidates=2))
    assert found(result) == ["a.otab", "b.otab"]
    reasons = skipped(result)
    assert reasons["c.otab"] == "more than 2 bundles: not read"
    assert any(r == "name longer than 30 bytes" for r in reasons.values())
