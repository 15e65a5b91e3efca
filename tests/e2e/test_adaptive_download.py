"""Adaptive download (agent.adaptive): a *full* bundle on a real origin (the lab
server `ota-fleet serve` uses, with Range and ETag) installed onto a simulated
device whose slots hold the previous image. Only the payloads of the ops whose
extent no slot holds cross the network; an identical image downloads nearly
nothing; `[download] max_download_ratio` / `max_download_bytes` refuse before
anything is written; a server ignoring Range falls back to the plain stream;
a local extent that changes after it was chosen is caught by its hash.
(Matching blocks anywhere, with the block index: tests/e2e/test_adaptive_blocks.py.)"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import adaptive, sim
from bundler.cli import main as bundle_main
from bundler.format import manifest
from bundler.format.header import HEADER_SIZE, Header
from bundler.format.ops import OpType, unpack_table
from tests.e2e._download import Origin, download_table, origin
from tests.e2e._sim import COMPATIBLE, SimDevice, sha256_file, write_image
from tests.e2e.conftest import KeyPair

MiB = 1 << 20
IMAGE = 24 * MiB
CHANGES = (5 * MiB + 1000, 17 * MiB + 3)  # two edits, in two different ops


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("adaptive")
    v1 = write_image(d / "v1.img", 7, IMAGE)
    data = bytearray(v1.read_bytes())
    for at in CHANGES:
        data[at : at + 64] = bytes(b ^ 0x5A for b in data[at : at + 64])
    v2 = d / "v2.img"
    v2.write_bytes(bytes(data))
    return v1, v2


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Origin]:
    yield from origin(tmp_path / "www")


def device_on(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: KeyPair, factory: Path) -> SimDevice:
    sim.init(sim.SimSpec(tmp_path / "device", factory, key.public, COMPATIBLE, slot_size=IMAGE + MiB))
    return SimDevice(tmp_path / "device", capsys)


def full_bundle(tmp_path: Path, key: KeyPair, image: Path, *options: str) -> Path:
    out = tmp_path / f"{image.stem}.otab"
    argv = ["create", "--image", str(image), "--key", str(key.private), "--version", "2.0",
            "--security-version", "2", "--compatible", COMPATIBLE, "--level", "3", *options, "-o", str(out)]
    assert bundle_main(argv) == 0
    return out


def layout(bundle: Path, *olds: Path) -> tuple[int, int]:
    """(bytes before the payload plus the block index, payload bytes of the ops whose
    extent none of `olds` holds at the op's own offset)."""
    raw = bundle.read_bytes()
    header = Header.unpack(raw[:HEADER_SIZE])
    start = HEADER_SIZE + header.manifest_length + header.signature_length
    ops = unpack_table(raw[start : start + header.op_table_length])
    index = manifest.parse(raw[HEADER_SIZE : HEADER_SIZE + header.manifest_length]).block_index
    bases = [old.read_bytes() for old in olds]
    new = 0
    for op in ops:
        held = {hashlib.sha256(b[op.dst_offset : op.dst_offset + op.dst_length]).digest() for b in bases}
        if op.type is OpType.REPLACE and op.dst_sha256 not in held:
            new += op.payload_length
    return start + header.op_table_length + (index.length if index else 0), new


def last_result(device: SimDevice) -> dict[str, Any]:
    last: dict[str, Any] = device.status()["last_result"]
    return last


def test_a_full_bundle_downloads_only_the_ops_that_changed_and_commits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, pair: tuple[Path, Path], lab: Origin
) -> None:
    v1, v2 = pair
    bundle = full_bundle(tmp_path, signing_key, v2)
    head, changed = layout(bundle, v1)
    assert 0 < changed < bundle.stat().st_size / 3
    dev = device_on(tmp_path, capsys, signing_key, v1)
    download_table(dev, adaptive=True)

    dev.install_ok(lab.url(lab.publish(bundle)))

    last = last_result(dev)
    assert (last["result"], last["slot"]) == ("ok", "B")
    downloaded = int(last["downloaded"])
    # head + op table, the 1-byte Range probe, the changed payloads (and coalesced gaps <= 64 KiB)
    assert head + changed <= downloaded <= head + changed + 1 + 2 * adaptive.COALESCE_GAP
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(v2)
    assert dev.slot_image_sha256("A", IMAGE) == sha256_file(v1), "the booted slot is untouched"
    assert any(r is not None and r != "bytes=0-0" for r in lab.ranges()), "payloads came by Range"
    dev.boot()
    doc = dev.status()
    assert (doc["booted"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "good", "2.0")


def test_what_an_interrupted_attempt_wrote_into_the_target_slot_is_not_downloaded_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, pair: tuple[Path, Path], lab: Origin
) -> None:
    v1, v2 = pair
    bundle = full_bundle(tmp_path, signing_key, v2)
    dev = device_on(tmp_path, capsys, signing_key, v1)
    download_table(dev, adaptive=True)
    half = IMAGE // 2  # the first change lies before, the second after
    with v2.open("rb") as src, dev.slot_path("B").open("r+b") as dst:  # an attempt cut halfway
        dst.write(src.read(half))
    partial = tmp_path / "partial.img"
    partial.write_bytes(dev.slot_path("B").read_bytes()[:IMAGE])
    head, changed = layout(bundle, v1, partial)
    _, both = layout(bundle, v1)
    assert 0 < changed < both

    dev.install_ok(lab.url(lab.publish(bundle)))

    downloaded = int(last_result(dev)["downloaded"])
    assert head + changed <= downloaded <= head + changed + 1 + 2 * adaptive.COALESCE_GAP
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(v2)


def test_an_identical_image_downloads_only_the_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, pair: tuple[Path, Path], lab: Origin
) -> None:
    v1, _ = pair
    bundle = full_bundle(tmp_path, signing_key, v1)
    head, changed = layout(bundle, v1)
    assert changed == 0
    dev = device_on(tmp_path, capsys, signing_key, v1)
    download_table(dev, adaptive=True)

    run = dev.install(lab.url(lab.publish(bundle)), "--reinstall")

    assert run.rc == 0, run.err
    last = last_result(dev)
    assert last["result"] == "ok"
    assert head <= int(last["downloaded"]) <= head + 1
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(v1)


@pytest.mark.parametrize("limit", [{"max_download_ratio": 0.05}, {"max_download_bytes": 100_000}])
def test_a_download_over_the_limit_is_refused_before_anything_is_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    signing_key: KeyPair,
    pair: tuple[Path, Path],
    lab: Origin,
    limit: dict[str, object],
) -> None:
    v1, v2 = pair
    bundle = full_bundle(tmp_path, signing_key, v2)
    dev = device_on(tmp_path, capsys, signing_key, v1)
    download_table(dev, adaptive=True, **limit)
    before = dev.snapshot()

    direct = f"http://127.0.0.1:{lab.server.server_address[1]}/{lab.publish(bundle)}"  # the origin itself
    line = dev.install(direct).one_error_line()

    key = next(iter(limit))
    assert "adaptive download would download" in line, line
    assert f"max_download_{key.split('_')[-1]}" in line, line
    assert "nothing written" in line
    after = dev.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B"))
    assert after.bootloader == before.bootloader, "slot B was not even marked bad"
    assert dev.outbox()[-1]["result"] == "failed"


def test_a_server_ignoring_range_falls_back_to_the_plain_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, pair: tuple[Path, Path]
) -> None:
    v1, v2 = pair
    bundle = full_bundle(tmp_path, signing_key, v2)
    dev = device_on(tmp_path, capsys, signing_key, v1)
    download_table(dev, adaptive=True)
    for lab in origin(tmp_path / "www-norange", ignore_range=True):
        dev.install_ok(lab.url(lab.publish(bundle)))
    last = last_result(dev)
    size = bundle.stat().st_size
    assert last["result"] == "ok"
    assert size <= int(last["downloaded"]) < 1.1 * size
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(v2)


def test_a_local_extent_changed_after_it_was_chosen_is_caught_by_its_hash(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    signing_key: KeyPair,
    pair: tuple[Path, Path],
    lab: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1, v2 = pair
    bundle = full_bundle(tmp_path, signing_key, v2, "--no-block-index")  # ops found at their own offset
    dev = device_on(tmp_path, capsys, signing_key, v1)
    download_table(dev, adaptive=True)
    booted = dev.slot_path("A")
    real = adaptive.prepare
    spoiled: list[int] = []

    def then_spoil(*args: Any, **kwargs: Any) -> adaptive.Decision | None:
        decision = real(*args, **kwargs)
        assert decision is not None
        index = decision.decisions.index(1)  # the first op taken from the booted slot
        op = args[1][index]
        with booted.open("r+b") as f:  # the booted slot changes under the install
            f.seek(op.dst_offset + 10)
            f.write(b"not what was hashed")
        spoiled.append(index)
        return decision

    monkeypatch.setattr(adaptive, "prepare", then_spoil)

    line = dev.install(lab.url(lab.publish(bundle))).one_error_line()

    assert spoiled
    assert "changed since it was chosen" in line, line
    doc = dev.status()
    assert (doc["booted"], doc["primary"]) == ("A", "A")
    assert doc["slots"]["B"]["bootable"] is False
    assert last_result(dev)["result"] == "failed"
