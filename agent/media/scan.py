"""Listing the bundles on a stick by the layout convention (`ota_common.media`):
`*.otab` at the top level, and under `edge-ota/` (any case) down to MAX_DEPTH
levels, skipping `edge-ota/reports/` and hidden names (`._x.otab` is macOS
metadata, not a bundle).

Nothing on the stick is trusted: every directory is opened relative to its
parent's descriptor with O_NOFOLLOW (a symlink is never followed, to a device's
own files or to /dev), every bundle file is opened the same way, non-blocking,
and must be a regular file (`open_candidate`). The walk looks at no more than
MAX_ENTRIES directory entries, refuses names longer than MAX_NAME bytes and
keeps at most MAX_CANDIDATES bundles; what it skips it lists with a reason.
Owns names and descriptors, not bundle contents (`agent.media.select`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ota_common import media as layout
from ota_common.text import clean

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Limits:
    depth: int = layout.MAX_DEPTH
    entries: int = layout.MAX_ENTRIES
    name: int = layout.MAX_NAME
    candidates: int = layout.MAX_CANDIDATES


@dataclass(slots=True)
class ScanResult:
    candidates: list[tuple[str, ...]] = field(default_factory=list)  # path parts from the root, in order
    skipped: list[layout.Ignored] = field(default_factory=list)
    entries: int = 0  # directory entries looked at
    truncated: bool = False  # stopped at the entry bound


def show(parts: tuple[str, ...]) -> str:
    return clean("/".join(parts), 2 * layout.NAME_LIMIT)


def scan(root_fd: int, limits: Limits = Limits()) -> ScanResult:
    result = ScanResult()
    _walk(root_fd, (), 0, limits, result)
    return result


def _walk(dir_fd: int, where: tuple[str, ...], depth: int, limits: Limits, out: ScanResult) -> None:
    subdirs: list[str] = []
    try:
        names = _list(dir_fd, limits, out)
    except OSError as e:
        out.skipped.append(layout.Ignored(show(where) or "/", f"directory unreadable: {e.strerror}"))
        return
    for name, kind in names:
        parts = (*where, name)
        if len(os.fsencode(name)) > limits.name:
            out.skipped.append(layout.Ignored(show(parts)[:80], f"name longer than {limits.name} bytes"))
            continue
        wanted_dir = layout.is_top_dir(name) if depth == 0 else not (depth == 1 and layout.is_reports_dir(name))
        if kind == "link":
            if depth > 0 or layout.is_bundle_name(name) or layout.is_top_dir(name):
                out.skipped.append(layout.Ignored(show(parts), "a symbolic link: not followed"))
            continue
        if kind == "dir":
            if wanted_dir and not name.startswith("."):
                if depth + 1 <= limits.depth:
                    subdirs.append(name)
                else:
                    out.skipped.append(layout.Ignored(show(parts), f"deeper than {limits.depth} levels: not read"))
            continue
        if not layout.is_bundle_name(name):
            continue
        if kind != "file":
            out.skipped.append(layout.Ignored(show(parts), "not a regular file"))
            continue
        if len(out.candidates) >= limits.candidates:
            out.skipped.append(layout.Ignored(show(parts), f"more than {limits.candidates} bundles: not read"))
            continue
        out.candidates.append(parts)
    for name in subdirs:
        if out.truncated:
            return
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            out.skipped.append(layout.Ignored(show((*where, name)), f"directory not opened: {e.strerror}"))
            continue
        try:
            _walk(fd, (*where, name), depth + 1, limits, out)
        finally:
            os.close(fd)


def _list(dir_fd: int, limits: Limits, out: ScanResult) -> list[tuple[str, str]]:
    """(name, kind) of one directory's entries, sorted, within the entry bound;
    kind from the entry type (lstat when the filesystem does not say): never followed."""
    found: list[tuple[str, str]] = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            if out.entries >= limits.entries:
                out.truncated = True
                out.skipped.append(layout.Ignored("(scan)", f"stopped after {limits.entries} directory entries"))
                break
            out.entries += 1
            if entry.is_symlink():
                kind = "link"
            elif entry.is_dir(follow_symlinks=False):
                kind = "dir"
            elif entry.is_file(follow_symlinks=False):
                kind = "file"
            else:
                kind = "other"
            found.append((entry.name, kind))
    found.sort()
    return found


class NotABundleFile(OSError):
    """The path names something that is not a regular file (or a link)."""


def open_candidate(root_fd: int, parts: tuple[str, ...]) -> tuple[int, int]:
    """(descriptor, size) of a candidate: each directory component and the file
    opened relative to its parent with O_NOFOLLOW; the file must be regular.
    Raises OSError (ELOOP for a symlink put there after the scan)."""
    fds: list[int] = []
    try:
        parent = root_fd
        for name in parts[:-1]:
            parent = os.open(name, DIR_FLAGS, dir_fd=parent)
            fds.append(parent)
        fd = os.open(parts[-1], FILE_FLAGS, dir_fd=parent)
    finally:
        for d in fds:
            os.close(d)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotABundleFile(0, "not a regular file")
        os.set_blocking(fd, True)
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise
