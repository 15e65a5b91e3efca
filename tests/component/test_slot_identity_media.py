"""Slot identity on real media: the config loader and the slot writer compare
what paths name (inodes, device numbers, sysfs partition and loop relations,
the mount table), never path text.

Loop devices (losetup, as root) stand in for disks: a loop device over a file
is that file; a partitioned loop device contains its partitions; a mounted
partition, or a disk holding one, is never written. File slots: a symlink or
hard link to the booted slot, and a FIFO planted as a target, are refused
before a byte is written (the FIFO without blocking: run in a subprocess with
a hang guard)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from hw.errors import SlotError
from hw.slot import SlotWriter
from tests.component.test_slot_media import needs_loop

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Loop:
    backing: Path
    disk: Path
    parts: list[Path]


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[list[Loop]]:
    """`loops` starts empty; `attach(loops, tmp_path, partitioned)` adds one. Every
    mount under tmp_path and every loop device is undone at the end."""
    made: list[Loop] = []
    yield made
    for m in sorted(tmp_path.glob("mnt*"), reverse=True):
        subprocess.run(["umount", str(m)], check=False, capture_output=True)
    for loop in made:
        subprocess.run(["losetup", "-d", str(loop.disk)], check=False)


def attach(made: list[Loop], tmp_path: Path, *, partitioned: bool = False) -> Loop:
    backing = tmp_path / f"disk{len(made)}.img"
    with backing.open("wb") as f:
        f.truncate(16 * MiB)
    if partitioned:  # two 4 MiB GPT partitions
        subprocess.run(["sfdisk", "-q", str(backing)], input="label: gpt\n,4M\n,4M\n", text=True, check=True)
    out = subprocess.run(["losetup", "--show", "-f", *(["-P"] if partitioned else []), str(backing)],
                         capture_output=True, text=True, check=True)
    disk = Path(out.stdout.strip())
    loop = Loop(backing, disk, [])
    made.append(loop)
    if partitioned:
        parts = [Path(f"{disk}p1"), Path(f"{disk}p2")]
        if not all(p.exists() for p in parts):
            # Kernels without partition-table parsers ignore -P; partx adds the
            # partitions from user space (BLKPG), the same kernel objects.
            subprocess.run(["partx", "-a", str(disk)], check=True, capture_output=True)
        assert all(p.exists() for p in parts), f"no partitions on {disk}"
        loop.parts = parts
    return loop


def write_config(tmp_path: Path, a: Path, b: Path) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(
        '[device]\ncompatible = "x"\nstate_dir = "state"\nkeyring = "keys"\n'
        '[bootloader]\nbackend = "sim"\npath = "boot.json"\n'
        f'[[slots]]\nbootname = "A"\npath = "{a}"\n'
        f'[[slots]]\nbootname = "B"\npath = "{b}"\n'
    )
    return p


# --- loop devices -----------------------------------------------------------------


@needs_loop
def test_config_refuses_a_loop_device_over_the_other_slots_file_either_way(tmp_path: Path, loops: list[Loop]) -> None:
    loop = attach(loops, tmp_path)
    for a, b in ((loop.backing, loop.disk), (loop.disk, loop.backing)):
        with pytest.raises(ConfigError, match=r"not distinct storage") as info:
            config.load(write_config(tmp_path, a, b))
        assert f"slot rootfs A ('{a}')" in str(info.value)
        assert f"slot rootfs B ('{b}')" in str(info.value)
        assert str(loop.backing) in str(info.value)


@needs_loop
def test_writer_refuses_a_loop_device_over_the_booted_slots_file_and_writes_nothing(
    tmp_path: Path, loops: list[Loop]
) -> None:
    loop = attach(loops, tmp_path)
    loop.backing.write_bytes(os.urandom(16 * MiB))
    before = digest(loop.backing)
    with pytest.raises(SlotError, match=f"overlaps {loop.backing} of the booted slot A"):
        SlotWriter(loop.disk, "B", booted="A", booted_paths=[loop.backing])
    with pytest.raises(SlotError, match=f"overlaps {loop.disk} of the booted slot A"):
        SlotWriter(loop.backing, "B", booted="A", booted_paths=[loop.disk])
    assert digest(loop.backing) == before


@needs_loop
def test_partitioned_disk_overlaps_its_partitions_but_two_partitions_are_distinct(
    tmp_path: Path, loops: list[Loop]
) -> None:
    loop = attach(loops, tmp_path, partitioned=True)
    p1, p2 = loop.parts
    for a, b in ((p1, loop.disk), (loop.disk, p2), (p1, loop.backing)):
        with pytest.raises(ConfigError, match=r"not distinct storage"):
            config.load(write_config(tmp_path, a, b))
    assert [s.path for s in config.load(write_config(tmp_path, p1, p2)).slots] == [p1, p2]

    before = digest(loop.backing)
    with pytest.raises(SlotError, match=f"overlaps {p1} of the booted slot A"):
        SlotWriter(loop.disk, "B", booted="A", booted_paths=[p1])
    with pytest.raises(SlotError, match=f"overlaps {loop.disk} of the booted slot A"):
        SlotWriter(p2, "B", booted="A", booted_paths=[loop.disk])
    assert digest(loop.backing) == before
    with SlotWriter(p2, "B", booted="A", booted_paths=[p1]) as w:  # a neighbouring partition is fine
        assert w.capacity == 4 * MiB
        w.write(0, b"\xab" * 4096)
        w.sync()
    with loop.backing.open("rb") as f:  # landed at partition 2's start (sector 10240), nowhere else
        f.seek(10240 * 512)
        assert f.read(4096) == b"\xab" * 4096


@needs_loop
def test_writer_refuses_a_mounted_partition_the_disk_holding_it_and_the_file_behind_it(
    tmp_path: Path, loops: list[Loop]
) -> None:
    loop = attach(loops, tmp_path, partitioned=True)
    p2 = loop.parts[1]
    subprocess.run(["mkfs.ext4", "-q", str(p2)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", str(p2), str(mnt)], check=True)
    (mnt / "data").write_bytes(b"mounted")
    os.sync()
    before = digest(loop.backing)
    for target in (p2, loop.disk):
        with pytest.raises(SlotError, match=f"mounted at {mnt}"):
            SlotWriter(target, "B", booted="A", booted_paths=[])
    with pytest.raises(SlotError, match=f"mounted at {mnt}"):
        SlotWriter(loop.backing, "B", booted="A", booted_paths=[])
    assert digest(loop.backing) == before


@needs_loop
def test_mount_table_is_read_from_mountinfo_with_escaped_mount_points(tmp_path: Path, loops: list[Loop]) -> None:
    loop = attach(loops, tmp_path)
    rdev = loop.disk.stat().st_rdev
    fake = tmp_path / "mountinfo"
    fake.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"40 27 {os.major(rdev)}:{os.minor(rdev)} / /srv/with\\040space rw,relatime - ext4 {loop.disk} rw\n"
    )
    with pytest.raises(SlotError, match=r"mounted at /srv/with space"):
        SlotWriter(loop.disk, "B", booted="A", booted_paths=[], mountinfo=fake)
    with pytest.raises(SlotError, match=r"mounted at /srv/with space"):  # the file behind the "mounted" loop
        SlotWriter(loop.backing, "B", booted="A", booted_paths=[], mountinfo=fake)
    fake.write_text("22 27 0:21 / /proc rw,relatime - proc proc rw\n")
    with SlotWriter(loop.disk, "B", booted="A", booted_paths=[], mountinfo=fake) as w:
        assert w.block_device


@needs_loop
def test_writer_refuses_the_file_that_backs_the_running_root(tmp_path: Path, loops: list[Loop]) -> None:
    loop = attach(loops, tmp_path, partitioned=True)
    subprocess.run(["mkfs.ext4", "-q", str(loop.parts[1])], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", str(loop.parts[1]), str(mnt)], check=True)
    empty = tmp_path / "mountinfo"
    empty.write_text("")
    before = digest(loop.backing)
    with pytest.raises(SlotError, match=r"holds the running root filesystem"):  # as if / were that filesystem
        SlotWriter(loop.backing, "B", booted="A", booted_paths=[], mountinfo=empty, root=mnt)
    assert digest(loop.backing) == before


# --- files --------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_writer_refuses_a_target_that_is_a_link_to_the_booted_slot(tmp_path: Path, link: str) -> None:
    booted = tmp_path / "slot-A.img"
    booted.write_bytes(os.urandom(MiB))
    target = tmp_path / "slot-B.img"
    if link == "symlink":
        target.symlink_to(booted)
    else:
        os.link(booted, target)
    before = digest(booted)
    with pytest.raises(SlotError, match=r"of the booted slot A .*same file"):
        SlotWriter(target, "B", booted="A", booted_paths=[booted])
    assert digest(booted) == before


def test_writer_refuses_a_fifo_target_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "slot-B.img"
    os.mkfifo(fifo)
    code = (
        "import sys; from pathlib import Path; from hw.slot import SlotWriter; from hw.errors import SlotError\n"
        "try:\n    SlotWriter(Path(sys.argv[1]), 'B', booted='A', booted_paths=[])\n"
        "except SlotError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60,
                         cwd=REPO, check=True)
    assert "neither a block device nor a regular file" in out.stdout
