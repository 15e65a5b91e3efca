"""The three-way /etc merge on directory trees (no root): the booted image's
defaults (old), the device's /etc (current) and the new image's /etc (new).
Local edits, permission changes and deletions stay; new defaults arrive;
conflicts (both changed, file vs directory, type changes, deleted on one side)
are listed and the policy decides; symlinks are entries, never followed; a
power cut during the merge leaves the old or the merged /etc, never a mix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import InstallError
from agent.etcmerge import EtcConfig, EtcConflictError, OnConflict, Policy, merge_into_slot, merge_trees
from tests.oci._trees import summary


def tree(root: Path, spec: dict[str, str | None]) -> Path:
    """`name: content` files, `name/` directories, `name -> target` symlinks."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in spec.items():
        if name.endswith("/"):
            (root / name).mkdir(parents=True, exist_ok=True)
        elif " -> " in name:
            link, target = name.split(" -> ")
            (root / link).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, root / link)
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(content or "")
    return root


BASE = {"hostname": "default", "motd": "welcome", "ssh/": None, "ssh/sshd_config": "Port 22", "app.d/": None}
BASE |= {"app.d/a.conf": "a=1", "fstab": "rootfs", "shadow": "root:*"}


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path, Path]:
    """old, current (a copy of old), and a new slot root whose etc is a copy of old."""
    return tree(tmp_path / "old", BASE), tree(tmp_path / "cur", BASE), tree(tmp_path / "slot/etc", BASE).parent


def contents(etc: Path) -> dict[str, str]:
    out = {}
    for p in sorted(etc.rglob("*")):
        rel = p.relative_to(etc).as_posix()
        out[rel] = "-> " + os.readlink(p) if p.is_symlink() else ("/" if p.is_dir() else p.read_text())
    return out


def test_local_edits_and_deletions_stay_and_new_defaults_arrive(trees: tuple[Path, Path, Path]) -> None:
    old, cur, slot = trees
    (cur / "hostname").write_text("device-17")  # local edit
    (cur / "motd").unlink()  # local deletion
    (slot / "etc/app.d/b.conf").write_text("b=2")  # new default
    (slot / "etc/ssh/sshd_config").write_text("Port 22\nPermitRootLogin no")  # image change, unchanged locally
    (slot / "etc/fstab").unlink()  # the image drops a file the device did not touch
    result = merge_trees(old, cur, slot, EtcConfig(merge=True))
    assert contents(slot / "etc") == {
        "app.d": "/",
        "app.d/a.conf": "a=1",
        "app.d/b.conf": "b=2",
        "hostname": "device-17",
        "shadow": "root:*",
        "ssh": "/",
        "ssh/sshd_config": "Port 22\nPermitRootLogin no",
    }
    assert result.conflicts == ()
    assert result.from_new == 3
    assert result.kept_local == 2


def test_permission_changes_merge_like_content(trees: tuple[Path, Path, Path]) -> None:
    old, cur, slot = trees
    os.chmod(cur / "shadow", 0o600)  # local
    os.chmod(slot / "etc/fstab", 0o600)  # image
    merge_trees(old, cur, slot, EtcConfig(merge=True))
    assert oct((slot / "etc/shadow").stat().st_mode & 0o777) == "0o600"
    assert oct((slot / "etc/fstab").stat().st_mode & 0o777) == "0o600"
    assert oct((slot / "etc/hostname").stat().st_mode & 0o777) == oct((cur / "hostname").stat().st_mode & 0o777)


def test_both_changed_fails_the_merge_by_default_and_leaves_the_slot_untouched(
    trees: tuple[Path, Path, Path],
) -> None:
    old, cur, slot = trees
    (cur / "hostname").write_text("device-17")
    (slot / "etc/hostname").write_text("new-default")
    before = summary(slot)
    with pytest.raises(EtcConflictError, match=r"1 conflicts: hostname \(changed on the device and in the new image\)"):
        merge_trees(old, cur, slot, EtcConfig(merge=True))
    assert summary(slot) == before
    assert [p.name for p in slot.iterdir()] == ["etc"]


@pytest.mark.parametrize(("on_conflict", "expected"), [("keep-local", "device-17"), ("take-new", "new-default")])
def test_the_conflict_policy_decides_and_the_conflict_is_still_listed(
    trees: tuple[Path, Path, Path], on_conflict: str, expected: str
) -> None:
    old, cur, slot = trees
    (cur / "hostname").write_text("device-17")
    (slot / "etc/hostname").write_text("new-default")
    result = merge_trees(old, cur, slot, EtcConfig(merge=True, on_conflict=OnConflict(on_conflict)))
    assert (slot / "etc/hostname").read_text() == expected
    assert [c.kind for c in result.conflicts] == ["both-changed"]
    assert "hostname" in result.summary()


def test_file_versus_directory_and_type_changes_are_conflicts(trees: tuple[Path, Path, Path]) -> None:
    old, cur, slot = trees
    (cur / "app.d/a.conf").unlink()
    (cur / "app.d").rmdir()
    (cur / "app.d").write_text("a file now")  # a directory replaced by a file on the device ...
    (slot / "etc/app.d/b.conf").write_text("b=2")  # ... while the image adds to it
    (cur / "motd").unlink()
    os.symlink("/run/motd", cur / "motd")  # file -> symlink on the device
    (slot / "etc/motd").write_text("new welcome")  # and changed in the image
    with pytest.raises(EtcConflictError) as caught:
        merge_trees(old, cur, slot, EtcConfig(merge=True))
    kinds = {c.path: c.kind for c in caught.value.result.conflicts}
    assert kinds == {"app.d": "under-local-change", "motd": "type-changed"}
    assert "a file on the device, the new image changes what is under it" in str(caught.value)


def test_deleted_on_one_side_and_changed_on_the_other_is_a_conflict(trees: tuple[Path, Path, Path]) -> None:
    old, cur, slot = trees
    (cur / "motd").unlink()
    (slot / "etc/motd").write_text("changed")
    (cur / "fstab").write_text("local")
    (slot / "etc/fstab").unlink()
    with pytest.raises(EtcConflictError) as caught:
        merge_trees(old, cur, slot, EtcConfig(merge=True))
    assert {c.path: c.kind for c in caught.value.result.conflicts} == {
        "fstab": "deleted-in-new",
        "motd": "deleted-locally",
    }


def test_symlinks_are_kept_as_links_and_never_followed(trees: tuple[Path, Path, Path], tmp_path: Path) -> None:
    old, cur, slot = trees
    secret = tree(tmp_path / "outside", {"secret": "do not copy"})
    os.symlink(secret / "secret", cur / "leak")
    os.symlink(secret, cur / "leakdir")
    os.symlink("../../../../outside", cur / "ssh/up")
    merge_trees(old, cur, slot, EtcConfig(merge=True))
    etc = slot / "etc"
    assert os.readlink(etc / "leak") == str(secret / "secret")
    assert os.readlink(etc / "leakdir") == str(secret)
    assert os.readlink(etc / "ssh/up") == "../../../../outside"
    assert not any(p.read_text() == "do not copy" for p in etc.rglob("*") if p.is_file() and not p.is_symlink())


def test_keep_and_replace_policies_apply_to_a_path_and_its_subtree(trees: tuple[Path, Path, Path]) -> None:
    old, cur, slot = trees
    (cur / "ssh/sshd_config").write_text("local")
    (slot / "etc/ssh/sshd_config").write_text("image")
    (cur / "ssh/host_key").write_text("device key")
    (cur / "hostname").write_text("device-17")
    (slot / "etc/hostname").write_text("image-name")
    rules = (("ssh", Policy.KEEP), ("hostname", Policy.REPLACE))
    result = merge_trees(old, cur, slot, EtcConfig(merge=True, paths=rules))
    assert (slot / "etc/ssh/sshd_config").read_text() == "local"
    assert (slot / "etc/ssh/host_key").read_text() == "device key"
    assert (slot / "etc/hostname").read_text() == "image-name"
    assert result.conflicts == ()


def test_the_new_image_factory_copy_is_the_new_side_when_present(trees: tuple[Path, Path, Path]) -> None:
    old, cur, slot = trees
    tree(slot / "usr/share/factory/etc", BASE | {"added": "from factory"})
    merge_trees(old, cur, slot, EtcConfig(merge=True))
    assert (slot / "etc/added").read_text() == "from factory"


def test_missing_old_defaults_are_a_clear_error(trees: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, cur, slot = trees
    with pytest.raises(InstallError, match=r"defaults .* are missing \(\[etc\] old\)"):
        merge_trees(tmp_path / "nothing", cur, slot, EtcConfig(merge=True))


MERGE_SCRIPT = """
import sys
from pathlib import Path
from agent.etcmerge import EtcConfig, merge_trees
merge_trees(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), EtcConfig(merge=True))
"""


@pytest.mark.parametrize("point", ["etc-merge-before-swap", "etc-merge-after-swap"])
def test_a_power_cut_during_the_merge_leaves_the_old_or_the_merged_etc(
    trees: tuple[Path, Path, Path], tmp_path: Path, point: str
) -> None:
    old, cur, slot = trees
    (cur / "hostname").write_text("device-17")
    (slot / "etc/app.d/b.conf").write_text("b=2")
    unmerged = contents(slot / "etc")
    reference = tree(tmp_path / "ref/etc", {}).parent
    for name, value in unmerged.items():
        (reference / "etc" / name).mkdir() if value == "/" else (reference / "etc" / name).write_text(value)
    merge_trees(old, cur, reference, EtcConfig(merge=True))
    merged = contents(reference / "etc")
    argv = [sys.executable, "-c", MERGE_SCRIPT, str(old), str(cur), str(slot)]
    env = {**os.environ, "EDGE_OTA_CRASHPOINT": point}
    cut = subprocess.run(argv, env=env, check=False, capture_output=True)
    assert cut.returncode == -9  # SIGKILL at the crash point
    assert contents(slot / "etc") == (unmerged if point == "etc-merge-before-swap" else merged)
    subprocess.run(argv, check=True)  # the next attempt cleans up what the cut left and merges
    assert contents(slot / "etc") == merged
    assert [p.name for p in slot.iterdir()] == ["etc"]


# --- hardlinks, extended attributes, read-only images ----------------------------------


def link_pair(root: Path, first: str, second: str, text: str) -> None:
    (root / first).parent.mkdir(parents=True, exist_ok=True)
    (root / first).write_text(text)
    os.link(root / first, root / second)


def test_hardlink_groups_are_kept_from_whichever_side_the_result_takes_them(trees: tuple[Path, Path, Path]) -> None:
    old, cur, slot = trees
    for root in (old, cur, slot / "etc"):
        link_pair(root, "issue", "issue.net", "Debian 12")
    (slot / "etc/issue").write_text("Debian 13")  # the image changes the group (both names: one inode)
    link_pair(cur, "local/a.conf", "local/b.conf", "x=1")  # a group only the device has
    result = merge_trees(old, cur, slot, EtcConfig(merge=True))
    etc = slot / "etc"
    assert result.conflicts == ()
    for first, second, text in (("issue", "issue.net", "Debian 13"), ("local/a.conf", "local/b.conf", "x=1")):
        assert (etc / first).read_text() == text
        assert os.stat(etc / first).st_ino == os.stat(etc / second).st_ino
        assert os.stat(etc / first).st_nlink == 2
    assert os.stat(etc / "hostname").st_nlink == 1  # no one else's inode shared


def test_extended_attributes_merge_like_modes(trees: tuple[Path, Path, Path]) -> None:
    old, cur, slot = trees
    new = slot / "etc"
    for root in (old, cur, new):
        os.setxattr(root / "hostname", "user.label", b"default")
        os.setxattr(root / "fstab", "user.label", b"default")
    os.setxattr(cur / "hostname", "user.label", b"device")  # a local xattr change: kept
    os.setxattr(new / "motd", "user.origin", b"image")  # the image adds one: it arrives
    os.setxattr(cur / "fstab", "user.label", b"device")  # both change the same file's xattr ...
    os.setxattr(new / "fstab", "user.label", b"image")
    with pytest.raises(EtcConflictError) as caught:  # ... differently: a conflict
        merge_trees(old, cur, slot, EtcConfig(merge=True))
    assert [(c.path, c.kind) for c in caught.value.result.conflicts] == [("fstab", "both-changed")]
    merge_trees(old, cur, slot, EtcConfig(merge=True, on_conflict=OnConflict.KEEP_LOCAL))
    assert os.getxattr(new / "hostname", "user.label") == b"device"
    assert os.getxattr(new / "motd", "user.origin") == b"image"
    assert os.getxattr(new / "fstab", "user.label") == b"device"
    assert os.listxattr(new / "shadow") == []


@pytest.mark.parametrize("fs", ["erofs", "squashfs"])
def test_a_read_only_image_refuses_the_merge_and_points_at_the_overlay_layout(
    trees: tuple[Path, Path, Path], tmp_path: Path, fs: str
) -> None:
    old, cur, slot = trees
    image = tmp_path / f"rootfs.{fs}"
    tool = {"erofs": ["mkfs.erofs", "--quiet", str(image), str(slot)],
            "squashfs": ["mksquashfs", str(slot), str(image), "-quiet", "-no-progress"]}[fs]
    subprocess.run(tool, check=True, capture_output=True)
    before = image.read_bytes()
    with pytest.raises(InstallError) as caught:
        merge_into_slot(image, EtcConfig(merge=True, old=old, current=cur))
    message = str(caught.value)
    assert f"slot {image} holds a read-only {fs} image" in message
    assert "data or overlay partition" in message
    assert "docs/containers.md" in message
    assert image.read_bytes() == before
