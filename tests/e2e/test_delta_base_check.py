"""How a delta install knows that the booted slot holds its base (docs/delta.md,
"Checking the base"), with the real CLIs on simulated devices:

- a slot record naming the base is trusted without reading the slot; what the
  delta reads is hash-checked extent by extent, so a slot changed behind its
  record fails the install on the first changed extent it reads, the target
  stays unbootable and the booted slot runs on; a change the delta never reads
  changes nothing of what is written;
- no record, or a record naming another image: the slot is hashed before
  anything is written; a slot that is not the base is refused with nothing
  written, a slot that is the base (a stale record) installs.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from agent.state import SlotRecord, StateStore
from bundler.format.apply import hints
from bundler.format.reader import BundleReader
from bundler.format.signing import Keyring, verify
from tests.e2e._sim import SimDevice, Snapshot, sha256_file
from tests.e2e.conftest import KeyPair
from tests.e2e.test_delta_install import create, device_on, fill_tree, mkfs

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) not installed")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """v1, v2 (one file edited, one added) and an unrelated image."""
    d = tmp_path_factory.mktemp("ext4")
    fill_tree(d / "v1", 1)
    shutil.copytree(d / "v1", d / "v2")
    edited = d / "v2" / "dir2" / "file1"
    edited.write_bytes(b"a security fix" + edited.read_bytes())
    (d / "v2" / "dir5" / "new").write_bytes((d / "v1" / "dir3" / "file2").read_bytes()[::2])
    fill_tree(d / "other", 9)
    return mkfs(d / "v1", d / "v1.ext4"), mkfs(d / "v2", d / "v2.ext4"), mkfs(d / "other", d / "other.ext4")


def base_reads(bundle: Path, keyring: Path) -> list[tuple[int, int]]:
    """Every [start, end) of the base the bundle's ops read."""
    with bundle.open("rb") as f:
        reader = BundleReader(f)
        verified = verify(reader.read_head(), Keyring.load(keyring))
        ops = reader.read_op_table(verified)
        spans = []
        for _, op, payload in reader.iter_payload(ops):
            ranges, _ = hints(op, payload)
            spans += [(offset, offset + length) for _, offset, length in ranges]
    return sorted(spans)


def unread_offset(spans: list[tuple[int, int]], size: int) -> int:
    at = 0
    for start, end in spans:
        if start > at:
            return at
        at = max(at, end)
    assert at < size, "the delta reads every byte of the base"
    return at


def set_record(dev: SimDevice, record: SlotRecord | None) -> None:
    store = StateStore(dev.dir / "state")
    state = store.load()
    slots = {k: v for k, v in state.slots.items() if k != "A"}
    if record is not None:
        slots["A"] = record
    store.save(replace(state, slots=slots))


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def assert_nothing_written(dev: SimDevice, before: Snapshot, line: str) -> None:
    assert "delta for rootfs applies to base" in line
    assert "nothing written" in line
    after = dev.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B"))
    assert after.bootloader == before.bootloader, "slot B was not even marked bad"
    assert dev.outbox()[-1]["result"] == "failed"


def test_a_slot_changed_behind_its_record_fails_on_the_first_changed_extent_and_slot_b_stays_unbootable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, pair: tuple[Path, Path, Path]
) -> None:
    v1, v2, _ = pair
    delta = create(tmp_path, signing_key, v2, "--base", str(v1))
    dev = device_on(tmp_path, capsys, signing_key, v1, "device")
    first_read = base_reads(delta, signing_key.public)[0][0]
    flip_byte(dev.slot_path("A"), first_read)  # the record still names v1
    changed_a = sha256_file(dev.slot_path("A"))

    line = dev.install(delta).one_error_line()

    assert "base source extent" in line
    assert "hash mismatch" in line
    assert "booted slot A does not hold what this delta reads there" in line
    assert "it changed since its slot record named the base, or the bundle is wrong" in line
    assert "slot B stays unbootable" in line
    assert dev.status()["slots"]["B"]["boot_state"] == "bad"
    assert sha256_file(dev.slot_path("A")) == changed_a, "the booted slot is never written"
    assert dev.outbox()[-1]["result"] == "failed"
    dev.boot()
    assert dev.status()["booted"] == "A"


def test_a_change_the_delta_never_reads_does_not_change_what_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, pair: tuple[Path, Path, Path]
) -> None:
    v1, v2, _ = pair
    delta = create(tmp_path, signing_key, v2, "--base", str(v1))
    dev = device_on(tmp_path, capsys, signing_key, v1, "device")
    flip_byte(dev.slot_path("A"), unread_offset(base_reads(delta, signing_key.public), v1.stat().st_size))

    run = dev.install(delta)

    assert run.rc == 0, run.err
    assert dev.slot_image_sha256("B", v2.stat().st_size) == sha256_file(v2)


@pytest.mark.parametrize("record", ["none", "another image"])
def test_without_a_record_naming_the_base_a_slot_that_is_not_the_base_is_refused_with_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, pair: tuple[Path, Path, Path],
    record: str,
) -> None:
    v1, v2, other = pair
    delta = create(tmp_path, signing_key, v2, "--base", str(v1))
    dev = device_on(tmp_path, capsys, signing_key, other, "elsewhere")
    if record == "none":
        set_record(dev, None)
    before = dev.snapshot()

    line = dev.install(delta).one_error_line()

    assert f"but booted slot A holds {sha256_file(other)[:16]}" in line
    assert_nothing_written(dev, before, line)


@pytest.mark.parametrize("record", ["none", "another image"])
def test_without_a_record_naming_the_base_a_slot_that_holds_it_is_hashed_and_installs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, pair: tuple[Path, Path, Path],
    record: str,
) -> None:
    v1, v2, other = pair
    delta = create(tmp_path, signing_key, v2, "--base", str(v1))
    dev = device_on(tmp_path, capsys, signing_key, v1, "device")
    stale = SlotRecord("0.9", sha256_file(other), 0, None, {"rootfs": sha256_file(other)})
    set_record(dev, None if record == "none" else stale)

    run = dev.install(delta)

    assert run.rc == 0, run.err
    assert dev.slot_image_sha256("B", v2.stat().st_size) == sha256_file(v2)
