"""Adaptive download with the block index (docs/bundle-format.md section 7.2): a
full bundle built with small chunks, served by a real HTTP origin (Range, ETag),
installed onto a simulated device whose slots hold data that *moved*. Every
4 KiB block of the bundle found anywhere in the slots is used, hash-checked;
only the chunks holding blocks no slot has cross the network. Blocks in the
slot being written are used only where the install has not overwritten them
yet. A signed index whose entries lie costs downloads, never a wrong write; a
damaged index is refused before anything is written."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent import adaptive, sim
from bundler.cli import main as bundle_main
from bundler.format import manifest as manifest_mod
from bundler.format.blockindex import BLOCK, block_hash, op_blocks
from bundler.format.header import HEADER_SIZE, Header
from bundler.format.manifest import Manifest
from bundler.format.ops import Op, OpTable, OpType, unpack_table
from bundler.format.signing import load_private_key
from bundler.format.writer import op_table_digest, write_bundle_file
from tests.e2e._download import Origin, download_table, origin
from tests.e2e._sim import COMPATIBLE, SimDevice, sha256_file
from tests.e2e.conftest import KeyPair

MiB = 1 << 20
IMAGE = 8 * MiB
CHUNK = 64 << 10
RUN = CHUNK // BLOCK  # blocks per chunk


def blocks_of(data: bytes) -> list[bytes]:
    return [data[at : at + BLOCK] for at in range(0, len(data), BLOCK)]


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """v1: random blocks. v2: v1's 64 KiB runs in another order (files rewritten
    elsewhere, as a filesystem rebuilt from scratch does), with new blocks in 6 runs."""
    d = tmp_path_factory.mktemp("moved")
    rng = random.Random(9)
    v1 = rng.randbytes(IMAGE)
    runs = [v1[at : at + CHUNK] for at in range(0, IMAGE, CHUNK)]
    rng.shuffle(runs)
    for k in rng.sample(range(len(runs)), 6):
        run = bytearray(runs[k])
        at = rng.randrange(RUN) * BLOCK
        run[at : at + BLOCK] = rng.randbytes(BLOCK)  # one new block in this run
        runs[k] = bytes(run)
    (d / "v1.img").write_bytes(v1)
    (d / "v2.img").write_bytes(b"".join(runs))
    return d / "v1.img", d / "v2.img"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Origin]:
    yield from origin(tmp_path / "www")


def device_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: KeyPair, factory: Path, **download: object
) -> SimDevice:
    sim.init(sim.SimSpec(tmp_path / "device", factory, key.public, COMPATIBLE, slot_size=IMAGE + MiB))
    dev = SimDevice(tmp_path / "device", capsys)
    download_table(dev, adaptive=True, **download)
    return dev


def full_bundle(tmp_path: Path, key: KeyPair, image: Path, *options: str, name: str = "v2.otab") -> Path:
    out = tmp_path / name
    argv = ["create", "--image", str(image), "--key", str(key.private), "--version", "2.0",
            "--security-version", "2", "--compatible", COMPATIBLE, "--level", "3", *(options or ("--chunk", "64K")),
            "-o", str(out)]
    assert bundle_main(argv) == 0
    return out


@dataclasses.dataclass
class Parts:
    header: Header
    manifest: Manifest
    ops: OpTable
    head: int  # bytes before the payload
    payload: bytes


def parts(bundle: Path) -> Parts:
    raw = bundle.read_bytes()
    header = Header.unpack(raw[:HEADER_SIZE])
    m = manifest_mod.parse(raw[HEADER_SIZE : HEADER_SIZE + header.manifest_length])
    start = header.op_table_offset
    ops = unpack_table(raw[start : start + header.op_table_length])
    return Parts(header, m, ops, header.payload_offset, raw[header.payload_offset :])


def fetched_payloads(p: Parts, held: set[bytes], ahead: dict[bytes, int] | None = None) -> int:
    """Payload bytes of the REPLACE ops with a block no slot holds (computed here from the
    images, not from the index): `held` holds anywhere, `ahead` only at or after its op."""
    total = 0
    for op in p.ops:
        if op.type is not OpType.REPLACE:
            continue
        data = _extent(p, op)
        ok = all(
            b in held or (ahead is not None and ahead.get(b, -1) >= op.dst_offset) for b in blocks_of(data)
        )
        total += 0 if ok else op.payload_length
    return total


def _extent(p: Parts, op: Op) -> bytes:
    frame = p.payload[op.payload_offset : op.payload_offset + op.payload_length]
    return zstandard.ZstdDecompressor().decompress(frame)


def downloaded(dev: SimDevice) -> int:
    last: dict[str, Any] = dev.status()["last_result"]
    assert last["result"] == "ok", last
    return int(last["downloaded"])


def test_moved_blocks_are_found_anywhere_in_the_slots_and_only_chunks_with_new_blocks_are_fetched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, moved: tuple[Path, Path],
    lab: Origin,
) -> None:
    v1, v2 = moved
    bundle = full_bundle(tmp_path, signing_key, v2)
    p = parts(bundle)
    assert p.manifest.block_index is not None
    index = p.manifest.block_index.length
    new = fetched_payloads(p, set(blocks_of(v1.read_bytes())))
    assert 0 < new < p.header.payload_length / 10  # 6 of 128 chunks hold a new block
    dev = device_on(tmp_path, capsys, signing_key, v1)

    run = dev.install_ok(lab.url(lab.publish(bundle)))

    got = downloaded(dev)
    # head and op table, the 1-byte probe, the index, the payloads of the 6 chunks (gaps <= 64 KiB read through)
    assert p.head + 1 + index + new <= got <= p.head + 1 + index + new + 6 * adaptive.COALESCE_GAP
    assert got < bundle.stat().st_size / 5
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(v2)
    assert dev.slot_image_sha256("A", IMAGE) == sha256_file(v1), "the booted slot is untouched"
    assert "block index of" in run.err, run.err  # the agent's log is on stderr
    assert "do not make its extent" not in run.err
    dev.boot()
    assert dev.status()["slots"]["B"]["version"] == "2.0"


@pytest.mark.parametrize("gap", [None, 0])
def test_chunks_cut_to_the_likely_base_fetch_only_the_new_blocks_from_a_device_holding_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, moved: tuple[Path, Path],
    lab: Origin, gap: int | None,
) -> None:
    v1, v2 = moved
    bundle = full_bundle(tmp_path, signing_key, v2, "--adaptive-base", str(v1))  # 4 MiB chunks, cut to v1
    p = parts(bundle)
    assert p.manifest.block_index is not None
    held = set(blocks_of(v1.read_bytes()))
    for op in p.ops:  # every op is all old blocks or all new ones
        assert len({b in held for b in blocks_of(_extent(p, op))}) == 1
    new = fetched_payloads(p, held)
    assert new <= 6 * (BLOCK + 64)  # six new random blocks, each a chunk of its own
    dev = device_on(tmp_path, capsys, signing_key, v1, **({} if gap is None else {"coalesce_gap": gap}))

    dev.install_ok(lab.url(lab.publish(bundle)))

    got = downloaded(dev)
    index = p.manifest.block_index.length
    if gap == 0:  # nothing read through: exactly the head, the probe, the index and the new chunks
        assert got == p.head + 1 + index + new
    else:
        assert p.head + 1 + index + new <= got <= p.head + 1 + index + new + 6 * adaptive.COALESCE_GAP
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(v2)


def test_blocks_in_the_slot_being_written_are_used_only_where_they_are_not_overwritten_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, lab: Origin,
) -> None:
    rng = random.Random(4)
    v1 = tmp_path / "v1.img"
    v1.write_bytes(rng.randbytes(IMAGE))
    early, late = rng.randbytes(MiB), rng.randbytes(MiB)  # neither is in v1
    v2 = tmp_path / "v2.img"  # wants `late` at 0 and `early` at 6 MiB
    body = bytearray(v1.read_bytes())
    body[0:MiB], body[6 * MiB : 7 * MiB] = late, early
    v2.write_bytes(bytes(body))
    bundle = full_bundle(tmp_path, signing_key, v2)
    dev = device_on(tmp_path, capsys, signing_key, v1)
    with dev.slot_path("B").open("r+b") as slot:  # an earlier attempt left `early` at 0, `late` at 6 MiB
        slot.write(early)
        slot.seek(6 * MiB)
        slot.write(late)
    p = parts(bundle)
    assert p.manifest.block_index is not None
    held = set(blocks_of(v1.read_bytes()))
    in_target = {b: 0 for b in blocks_of(early)} | {b: 6 * MiB for b in blocks_of(late)}
    need = fetched_payloads(p, held, in_target)  # `early`'s chunks: at 0 in slot B, overwritten before 6 MiB
    early_chunks = fetched_payloads(p, held | set(blocks_of(late)))
    assert need == early_chunks > 0

    run = dev.install_ok(lab.url(lab.publish(bundle)))

    got = downloaded(dev)
    index = p.manifest.block_index.length
    assert p.head + 1 + index + need <= got <= p.head + 1 + index + need + adaptive.COALESCE_GAP
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(v2)
    assert "block index of" in run.err, run.err  # the agent's log is on stderr
    assert "do not make its extent" not in run.err, "no block was read after it was overwritten"


def resign(bundle: Path, key: KeyPair, out: Path, *, index: bytes | None = None,
           manifest: dict[str, Any] | None = None) -> Path:
    """`bundle` with its block index region replaced by `index` (the manifest pinning it)
    and/or manifest fields replaced, signed again with the real key: a hostile but
    correctly signed bundle."""
    p = parts(bundle)
    ref = p.manifest.block_index
    assert ref is not None
    payload = p.payload
    m = p.manifest
    if index is not None:
        payload = payload[: ref.offset] + index
        ref = dataclasses.replace(ref, length=len(index), sha256=hashlib.sha256(index).hexdigest())
        m = dataclasses.replace(m, block_index=ref, payload_length=len(payload))
    if manifest is not None:
        m = dataclasses.replace(m, **manifest)
    assert op_table_digest(p.ops) == m.op_table_sha256
    write_bundle_file(out, m, p.ops, io.BytesIO(payload), [load_private_key(key.private)])
    return out


@dataclasses.dataclass
class Liar:
    parts: Parts  # the honest bundle's
    path: Path  # the same bundle, re-signed with an index that lies
    lied: int  # payload bytes of the ops whose index entries lie (their blocks must be fetched after all)
    honest: int  # payload bytes of the other ops (the decision fetches them)


def lying_index(tmp_path: Path, key: KeyPair, v1: Path, v2: Path) -> Liar:
    """v2's full bundle whose index says every full-size op is v1's first RUN blocks."""
    p = parts(full_bundle(tmp_path, key, v2))
    ref = p.manifest.block_index
    assert ref is not None
    entries = bytearray(p.payload[ref.offset :])
    first = blocks_of(v1.read_bytes())[:RUN]
    lie = b"".join(block_hash(b) for b in first)
    ordinal = honest = 0
    for op in p.ops:
        n = op_blocks(op)
        if n == RUN:
            entries[8 * ordinal : 8 * (ordinal + n)] = lie
        elif op.payload_length:
            honest += op.payload_length
        ordinal += n
    truly = b"".join(first)  # the one op whose extent really is those blocks is local, rightly
    lied = sum(op.payload_length for op in p.ops if op.type is OpType.REPLACE and _extent(p, op) != truly)
    return Liar(p, resign(tmp_path / "v2.otab", key, tmp_path / "liar.otab", index=bytes(entries)), lied, honest)


def test_a_signed_index_whose_entries_lie_costs_downloads_never_a_wrong_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, moved: tuple[Path, Path],
    lab: Origin,
) -> None:
    v1, v2 = moved
    liar = lying_index(tmp_path, signing_key, v1, v2)
    dev = device_on(tmp_path, capsys, signing_key, v1)

    run = dev.install_ok(lab.url(lab.publish(liar.path)))

    assert "do not make its extent" in run.err
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(v2), "every op's SHA-256 decided, not the index"
    ref = liar.parts.manifest.block_index
    assert ref is not None
    assert downloaded(dev) >= liar.parts.head + ref.length + liar.lied, "every payload the index lied about was fetched"


def test_a_damaged_block_index_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, moved: tuple[Path, Path],
    lab: Origin,
) -> None:
    v1, v2 = moved
    bundle = full_bundle(tmp_path, signing_key, v2)
    raw = bytearray(bundle.read_bytes())
    raw[-5] ^= 0xFF  # in the index (the payload's last region), which only its pinned hash covers
    damaged = tmp_path / "damaged.otab"
    damaged.write_bytes(bytes(raw))
    dev = device_on(tmp_path, capsys, signing_key, v1)
    before = dev.snapshot()

    line = dev.install(lab.url(lab.publish(damaged))).one_error_line()

    assert "block index" in line, line
    assert "mismatch" in line.lower(), line
    after = dev.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B")), "nothing written"
    assert after.bootloader == before.bootloader


def test_a_damaged_block_index_fails_a_plain_streamed_install_and_the_slot_stays_unbootable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, moved: tuple[Path, Path],
) -> None:
    v1, v2 = moved
    bundle = full_bundle(tmp_path, signing_key, v2)
    raw = bytearray(bundle.read_bytes())
    raw[-5] ^= 0xFF
    damaged = tmp_path / "damaged.otab"
    damaged.write_bytes(bytes(raw))
    dev = device_on(tmp_path, capsys, signing_key, v1)

    line = dev.install(damaged).one_error_line()  # a file: streamed front to back, the index checked last

    assert "block index" in line, line
    doc = dev.status()
    assert (doc["primary"], doc["slots"]["B"]["bootable"]) == ("A", False)


def test_payloads_fetched_because_the_index_lied_count_against_max_download_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, moved: tuple[Path, Path],
    lab: Origin,
) -> None:
    v1, v2 = moved
    liar = lying_index(tmp_path, signing_key, v1, v2)
    ref = liar.parts.manifest.block_index
    assert ref is not None
    slack = 256 * 1024  # the probe and the coalescing gaps the decision reads through
    assert liar.lied > 2 * slack
    cap = liar.parts.head + ref.length + liar.honest + slack
    dev = device_on(tmp_path, capsys, signing_key, v1, max_download_bytes=cap)
    before = dev.snapshot()

    line = dev.install(lab.url(lab.publish(liar.path))).one_error_line()

    assert "max_download_bytes" in line, line
    assert "changed since they were matched" in line, line
    assert "stays unbootable" in line, line
    after = dev.snapshot()
    assert after.slot("A") == before.slot("A"), "the running slot is never written"
    last = dev.status()["last_result"]
    assert last["result"] == "failed", last
    assert int(last["downloaded"]) <= cap, "the refused fetch was never made"
