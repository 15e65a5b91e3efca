"""The read-back that follows the writes (hw.readback) still checks what the
medium holds:

- ranges reported in any order, of any size, and an image length that is no
  multiple of a block are hashed exactly once, in order;
- it reads the medium, not the page cache: on a loop device whose backing file
  is changed under clean cached pages, the hash is that of the changed medium,
  with O_DIRECT and with the buffered fallback alike;
- an install whose slot is changed on the medium after a range was written
  fails its read-back, leaves the slot unbootable and no read-back thread
  running.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import random
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from agent import sim
from agent.daemon import build_device
from agent.installer import install
from bundler.build import BundleSpec, build_full
from bundler.format.errors import HashMismatchError
from bundler.format.signing import generate_key
from hw.bootloader.model import SlotBootState, next_boot
from hw.readback import OverlappedReadBack
from hw.slot import SlotWriter, read_back_sha256
from tests.component.test_slot_media import needs_loop

MiB = 1 << 20


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(loop device, its backing file): 16 MiB."""
    backing = tmp_path / "backing.img"
    with backing.open("wb") as f:
        f.truncate(16 * MiB)
    out = subprocess.run(["losetup", "--show", "-f", str(backing)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip(f"losetup failed: {out.stderr.strip()}")
    dev = Path(out.stdout.strip())
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


def pattern(size: int, seed: bytes = b"image") -> bytes:
    return hashlib.shake_256(seed).digest(size)


def no_read_back_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("read-back")]


def test_ranges_reported_in_any_order_are_hashed_once_in_order(tmp_path: Path) -> None:
    size = 9 * MiB + 12345  # no multiple of a block: the tail is read short
    data = pattern(size)
    slot = tmp_path / "slot.img"
    slot.write_bytes(bytes(size))
    ranges, at = [], 0
    rng = random.Random(7)
    while at < size:
        n = min(size - at, rng.choice([4096, 12288, 100_000, 3 * MiB]))
        ranges.append((at, n))
        at += n
    rng.shuffle(ranges)
    counted: list[int] = []
    with SlotWriter(slot, "B", booted="A", booted_paths=[]) as w, OverlappedReadBack(slot, "B", size) as check:
        for offset, n in ranges:
            w.write(offset, data[offset : offset + n])
            check.written(offset, n)
        w.sync()
        digest = check.finish(counted.append)
    assert digest == hashlib.sha256(data).hexdigest()
    assert sum(counted) == size
    assert no_read_back_threads()


def test_a_read_back_closed_before_the_end_stops_its_thread(tmp_path: Path) -> None:
    slot = tmp_path / "slot.img"
    slot.write_bytes(pattern(4 * MiB))
    check = OverlappedReadBack(slot, "B", 4 * MiB)
    check.written(0, 2 * MiB)  # half written: the thread reads that much, then waits
    check.close()
    assert no_read_back_threads()


def _changed_under_the_cache(
    dev: Path, backing: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, length: int, at: int
) -> None:
    if not direct:
        real_open = os.open

        def no_direct(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, mode)

        monkeypatch.setattr(os, "open", no_direct)
    size = 16 * MiB
    data = pattern(size)
    with SlotWriter(dev, "B", booted="A", booted_paths=[]) as w:
        w.write(0, data)
        w.sync()  # on the medium (the backing file), and clean in the device's page cache
        with open(dev, "rb") as cached:
            assert cached.read(4096) == data[:4096]  # the device's cache holds the written bytes
        fd = os.open(backing, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * 4096, at)  # the medium changes; the device's cache does not know
            os.fsync(fd)
        finally:
            os.close(fd)
        with OverlappedReadBack(dev, "B", length) as check:
            check.written(0, length)
            digest = check.finish()
            assert check.direct is direct
    medium = bytearray(data)
    medium[at : at + 4096] = b"\xff" * 4096
    assert digest == hashlib.sha256(medium[:length]).hexdigest()
    assert digest != hashlib.sha256(data[:length]).hexdigest()


@needs_loop
@pytest.mark.parametrize("direct", [True, False], ids=["o-direct", "buffered-fallback"])
@pytest.mark.parametrize(
    ("length", "at"),
    [(16 * MiB, 5 * MiB), (16 * MiB - 12345, 16 * MiB - 5 * 4096)],  # the second ends inside a page
    ids=["whole-device", "image-ends-mid-page"],
)
def test_the_read_back_reads_the_medium_not_the_page_cache(
    loop_device: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, direct: bool, length: int, at: int
) -> None:
    _changed_under_the_cache(*loop_device, monkeypatch, direct, length, at)


class ChangesTheMedium(SlotWriter):
    """A slot whose medium ends up holding other bytes than were written at one
    offset: the write goes to the device, is flushed, then the backing file is
    changed there (what a failing medium or a rogue writer would do)."""

    backing: Path
    at: int

    def write(self, offset: int, data: bytes | bytearray) -> None:
        super().write(offset, data)
        if offset <= self.at < offset + len(data):
            os.fsync(self.fd)
            fd = os.open(self.backing, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\x5a" * 512, self.at)
                os.fsync(fd)
            finally:
                os.close(fd)


@needs_loop
def test_a_slot_changed_on_the_medium_after_writing_fails_the_install_and_stays_bad(
    tmp_path: Path, loop_device: tuple[Path, Path]
) -> None:
    dev, backing = loop_device
    image = tmp_path / "v2.img"
    image.write_bytes(pattern(6 * MiB) + bytes(4 * MiB) + pattern(MiB, b"tail")[:54321])
    key, pub = generate_key(tmp_path / "keys")
    factory = tmp_path / "factory.img"
    factory.write_bytes(pattern(3 * MiB, b"factory"))
    config = sim.init(sim.SimSpec(tmp_path / "dev", factory, pub, "loop-board"))
    config.write_text(config.read_text().replace('path = "slot-B.img"', f'path = "{dev}"'))
    bundle = tmp_path / "v2.otab"
    build_full(BundleSpec(image, key, "2.0", 2, "loop-board"), bundle)
    booted_before = hashlib.sha256((tmp_path / "dev" / "slot-A.img").read_bytes()).hexdigest()

    def opener(path: Path, name: str, *, booted: str, booted_paths: Sequence[Path]) -> SlotWriter:
        writer = ChangesTheMedium(path, name, booted=booted, booted_paths=booted_paths)
        writer.backing, writer.at = backing, 2 * MiB + 512
        return writer

    device = dataclasses.replace(build_device(config), open_slot=opener)
    with bundle.open("rb") as stream, pytest.raises(HashMismatchError, match="slot B read-back"):
        install(device, stream)
    assert device.bootloader.state().slots["B"].state is SlotBootState.BAD
    assert next_boot(device.bootloader.state()) == "A"
    assert hashlib.sha256((tmp_path / "dev" / "slot-A.img").read_bytes()).hexdigest() == booted_before
    assert no_read_back_threads()

    # The same bundle onto the same medium, left alone, installs.
    device = build_device(config)
    with bundle.open("rb") as stream:
        assert install(device, stream).slot == "B"


@needs_loop
def test_the_one_pass_read_back_reads_the_medium_where_the_image_ends_mid_page(
    loop_device: tuple[Path, Path],
) -> None:
    dev, backing = loop_device
    length, at = 16 * MiB - 12345, 16 * MiB - 5 * 4096
    data = pattern(16 * MiB)
    with SlotWriter(dev, "B", booted="A", booted_paths=[]) as w:
        w.write(0, data)
        w.sync()
        with open(dev, "rb") as cached:
            assert cached.read(4096) == data[:4096]
        fd = os.open(backing, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * 4096, at)
            os.fsync(fd)
        finally:
            os.close(fd)
    medium = bytearray(data)
    medium[at : at + 4096] = b"\xff" * 4096
    assert read_back_sha256(dev, "B", length) == hashlib.sha256(medium[:length]).hexdigest()
