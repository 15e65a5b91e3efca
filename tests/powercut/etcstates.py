"""The /etc merge under power cuts: three small trees that exercise every kind
of entry the merge writes (files with their modes, directories new and kept,
symlinks, a local edit, a local deletion, a new default, a file the new image
dropped, a leftover staging tree of an earlier cut), a snapshot of an /etc
(kind, mode, content or target per path), and the check every cut state must
pass: the slot's /etc is exactly the old one or exactly the merged one, never a
mix, and merging again from there yields the merged one with nothing left
beside it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.etcmerge import STAGING, EtcConfig, merge_trees

Snapshot = dict[str, tuple[str, int, str]]

OLD = {
    "hostname": ("default", 0o644), "motd": ("welcome", 0o644), "shadow": ("root:*", 0o640),
    "ssh/sshd_config": ("Port 22", 0o644), "ssh/moduli": ("2048 4096", 0o644), "app.d/a.conf": ("a=1", 0o644),
    "gone.conf": ("dropped by the new image", 0o644),
}
LINKS = {"localtime": "../usr/share/zoneinfo/UTC"}


def _files(root: Path, files: dict[str, tuple[str, int]], links: dict[str, str]) -> None:
    for name, (text, mode) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
        os.chmod(root / name, mode)
    for name, target in links.items():
        os.symlink(target, root / name)


def make_trees(root: Path) -> tuple[Path, Path, Path]:
    """old (the booted image's defaults), cur (the device's /etc), slot (the new slot's root)."""
    old, cur, slot = root / "old", root / "cur", root / "slot"
    _files(old, OLD, LINKS)
    local = {**OLD, "hostname": ("device-17", 0o644), "shadow": ("root:*", 0o600), "local.d/x.conf": ("x", 0o600)}
    del local["motd"]
    _files(cur, local, LINKS)
    new = {**OLD, "ssh/sshd_config": ("Port 2222", 0o644), "app.d/b.conf": ("b=2", 0o644),
           "new.d/n.conf": ("n", 0o640)}
    del new["gone.conf"]
    _files(slot / "etc", new, {**LINKS, "resolv.conf": "../run/resolv.conf"})
    os.chmod(slot / "etc" / "new.d", 0o750)
    _files(slot / f"{STAGING}0badc0de", {"half.conf": ("a cut build", 0o600)}, {})
    os.sync()
    return old, cur, slot


def snapshot(etc: Path) -> Snapshot:
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(etc):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(etc).as_posix()
            st = os.lstat(p)
            if p.is_symlink():
                out[rel] = ("symlink", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, "")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, p.read_text())
    return out


def merged_reference(old: Path, cur: Path, slot: Path, work: Path) -> Snapshot:
    copy = work / "reference"
    shutil.copytree(slot, copy, symlinks=True)
    merge_trees(old, cur, copy, EtcConfig(merge=True))
    return snapshot(copy / "etc")


def describe(got: Snapshot, want: Snapshot) -> str:
    diff = sorted(p for p in set(got) | set(want) if got.get(p) != want.get(p))
    return ", ".join(f"{p} {got.get(p, 'absent')}" for p in diff[:4]) + (" ..." if len(diff) > 4 else "")


def check_state(old: Path, cur: Path, slot: Path, unmerged: Snapshot, merged: Snapshot) -> list[str]:
    """The slot's /etc as a cut left it is the old or the merged one; merging again completes it."""
    problems = []
    got = snapshot(slot / "etc")
    if got not in (unmerged, merged):
        problems.append(f"/etc is a mix: vs the old {describe(got, unmerged)}; vs the merged {describe(got, merged)}")
    try:
        merge_trees(old, cur, slot, EtcConfig(merge=True))
    except Exception as e:  # any failure of the next merge is the finding
        return [*problems, f"merging again failed: {type(e).__name__}: {e}"]
    again = snapshot(slot / "etc")
    if again != merged:
        problems.append(f"merging again gave {describe(again, merged)}")
    left = sorted(p.name for p in slot.iterdir() if p.name != "etc")
    if left:
        problems.append(f"merging again left {left} beside /etc")
    return problems
