"""Slots on real media: regular files and real block devices (loop devices
over files, set up with losetup as root). Writes land where they should,
zero ranges are zeroed without sending zeros (BLKZEROOUT / a punched hole),
the read-back hash reads what is on the medium, and the agent installs onto
block-device slots end to end."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sim
from agent.cli import main as agent_main
from bundler.build import BundleSpec, build_full
from bundler.format.signing import generate_key
from hw.errors import SlotError
from hw.slot import IO_CHUNK, SlotWriter, read_back_sha256, slot_size

MiB = 1 << 20


def _can_loop() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None and Path("/dev/loop-control").exists()


needs_loop = pytest.mark.skipif(not _can_loop(), reason="loop devices need root and losetup")


@pytest.fixture
def loop_devices(tmp_path: Path) -> Iterator[list[Path]]:
    made: list[Path] = []

    def attach(size: int) -> Path:
        backing = tmp_path / f"backing{len(made)}.img"
        with backing.open("wb") as f:
            f.truncate(size)
        out = subprocess.run(["losetup", "--show", "-f", str(backing)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            pytest.skip(f"losetup failed: {out.stderr.strip()}")
        dev = Path(out.stdout.strip())
        made.append(dev)
        return dev

    devices = [attach(32 * MiB), attach(32 * MiB)]
    try:
        yield devices
    finally:
        for dev in made:
            subprocess.run(["losetup", "-d", str(dev)], check=False)


def _pattern(size: int) -> bytes:
    return hashlib.shake_256(b"slot").digest(size)


def test_file_slot_zero_range_is_a_hole_and_reads_back_as_zeros(tmp_path: Path) -> None:
    slot = tmp_path / "slot.img"
    slot.write_bytes(_pattern(16 * MiB))
    with SlotWriter(slot, "B", booted="A", booted_paths=[]) as w:
        w.write_zeros(MiB, 2 * IO_CHUNK)
        w.sync()
    data = slot.read_bytes()
    assert len(data) == 16 * MiB
    assert data[MiB : MiB + 2 * IO_CHUNK] == bytes(2 * IO_CHUNK)
    assert data[:MiB] == _pattern(16 * MiB)[:MiB]
    assert os.stat(slot).st_blocks * 512 < 16 * MiB  # the range was punched, not written
    assert read_back_sha256(slot, "B", 16 * MiB) == hashlib.sha256(data).hexdigest()


def test_writer_refuses_the_booted_slot_and_writes_past_the_end(tmp_path: Path) -> None:
    slot = tmp_path / "slot.img"
    slot.write_bytes(bytes(MiB))
    with pytest.raises(SlotError, match="refusing to open the booted slot"):
        SlotWriter(slot, "A", booted="A", booted_paths=[])
    with SlotWriter(slot, "B", booted="A", booted_paths=[]) as w, pytest.raises(SlotError, match="exceeds slot size"):
        w.write(MiB - 10, bytes(20))


@needs_loop
def test_block_device_slot_zeroes_with_blkzeroout_and_reads_back_from_the_device(loop_devices: list[Path]) -> None:
    dev = loop_devices[0]
    assert slot_size(dev, "B") == 32 * MiB
    with SlotWriter(dev, "B", booted="A", booted_paths=[]) as w:
        assert w.block_device
        w.write(0, _pattern(32 * MiB))
        w.write_zeros(4096 + 100, 3 * IO_CHUNK)  # unaligned ends: zero bytes at the edges, BLKZEROOUT between
        w.sync()
    expected = bytearray(_pattern(32 * MiB))
    expected[4196 : 4196 + 3 * IO_CHUNK] = bytes(3 * IO_CHUNK)
    assert read_back_sha256(dev, "B", 32 * MiB) == hashlib.sha256(expected).hexdigest()


@needs_loop
def test_agent_installs_onto_block_device_slots_and_commits(
    tmp_path: Path, loop_devices: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "v2.img"
    image.write_bytes(_pattern(5 * MiB) + bytes(9 * MiB) + _pattern(MiB)[:12345])
    key, pub = generate_key(tmp_path / "keys")
    factory = tmp_path / "factory.img"
    factory.write_bytes(_pattern(3 * MiB))
    config = sim.init(sim.SimSpec(tmp_path / "dev", factory, pub, "loop-board"))
    text = config.read_text().replace('path = "slot-A.img"', f'path = "{loop_devices[0]}"')
    config.write_text(text.replace('path = "slot-B.img"', f'path = "{loop_devices[1]}"'))
    bundle = tmp_path / "v2.otab"
    build_full(BundleSpec(image, key, "2.0", 2, "loop-board"), bundle)

    assert agent_main(["-c", str(config), "install", str(bundle)]) == 0
    assert agent_main(["sim", "boot", str(tmp_path / "dev")]) == 0
    capsys.readouterr()
    assert agent_main(["-c", str(config), "status", "--json"]) == 0
    assert '"booted": "B"' in capsys.readouterr().out
    size = image.stat().st_size
    assert read_back_sha256(loop_devices[1], "B", size) == hashlib.sha256(image.read_bytes()).hexdigest()
