"""The block index (bundler.format.blockindex, docs/bundle-format.md section 7.2):
written by `ota-bundle create` for full bundles, one 8-byte entry per 4 KiB block
of every REPLACE op, pinned by the manifest; every malformed index (misplaced,
mis-sized, in a bundle without REPLACE ops, unknown keys, damaged bytes) is
refused with a specific error before any payload is used; `--chunk` cuts the
REPLACE ops, and a bad chunk size is refused naming the option."""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bundler.build import BundleSpec, OptionError, build_full
from bundler.cli import main as bundle_main
from bundler.format import blockindex
from bundler.format.errors import BoundsError, FormatError, HashMismatchError
from bundler.format.header import Header
from bundler.format.manifest import BlockIndexRef, parse
from bundler.format.ops import Op, OpType, unpack_table
from bundler.format.reader import BundleReader
from bundler.format.signing import verify
from bundler.planner import plan_full

from .conftest import KeyPair, SimSlot, assemble, manifest_for, stream_install

KiB, MiB = 1 << 10, 1 << 20


def image_bytes(size: int, seed: int = 3) -> bytes:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    data[MiB : 2 * MiB] = bytes(MiB)  # a zero MiB: a ZERO op, no index entries
    return bytes(data)


def build(tmp_path: Path, key: KeyPair, image: bytes, **spec: Any) -> bytes:
    src = tmp_path / "image.img"
    src.write_bytes(image)
    out = tmp_path / "out.otab"
    build_full(BundleSpec(image=src, key=key.private_path, version="1", security_version=1,
                          compatible="test-board", level=1, **spec), out, overwrite=True)
    return out.read_bytes()


def split(data: bytes) -> tuple[Header, Any, list[Op], bytes]:
    header = Header.unpack(data[:64])
    m = parse(data[64 : 64 + header.manifest_length])
    ops = list(unpack_table(data[header.op_table_offset : header.payload_offset]))
    return header, m, ops, data[header.payload_offset :]


def test_a_full_bundle_carries_one_entry_per_block_of_each_replace_op_in_table_order(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    image = image_bytes(3 * MiB + 5000)  # a partial last block, hashed as it is
    data = build(tmp_path, signing_key, image, chunk=256 * KiB)
    _, m, ops, payload = split(data)
    ref = m.block_index
    assert ref is not None
    replace_ops = [op for op in ops if op.type is OpType.REPLACE]
    assert all(op.dst_length <= 256 * KiB for op in replace_ops)
    expected = b""
    for op in replace_ops:
        extent = image[op.dst_offset : op.dst_offset + op.dst_length]
        expected += b"".join(hashlib.sha256(extent[at : at + 4096]).digest()[:8] for at in range(0, len(extent), 4096))
    assert payload[ref.offset :] == expected
    assert ref.offset == sum(op.payload_length for op in ops)
    assert hashlib.sha256(expected).hexdigest() == ref.sha256
    slot = SimSlot()
    stream_install(data, signing_key.keyring, slot)  # the stream reader reads and checks the index last
    assert bytes(slot.data) == image


def test_no_block_index_leaves_the_bundle_as_before(tmp_path: Path, signing_key: KeyPair) -> None:
    image = image_bytes(3 * MiB)
    data = build(tmp_path, signing_key, image, block_index=False)
    _, m, ops, payload = split(data)
    assert m.block_index is None
    assert "block_index" not in data[64 : 64 + 4096].decode("utf-8", "replace")
    assert len(payload) == sum(op.payload_length for op in ops)
    assert all(op.dst_length > 256 * KiB for op in ops if op.type is OpType.REPLACE)


def _resigned(data: bytes, key: KeyPair, *, ref: BlockIndexRef | None, payload: bytes | None = None,
              ops: list[Op] | None = None) -> bytes:
    _, m, old_ops, old_payload = split(data)
    ops = old_ops if ops is None else ops
    payload = old_payload if payload is None else payload
    images = (replace(m.images[0], op_count=len(ops)),)
    manifest = replace(manifest_for(ops, len(payload), images=images), block_index=ref)
    return assemble(manifest, ops, payload, [key.key])


def _read(data: bytes, key: KeyPair) -> None:
    reader = BundleReader(io.BytesIO(data))
    ops = reader.read_op_table(verify(reader.read_head(), key.keyring))
    for _ in reader.iter_payload(ops):
        pass


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda r: replace(r, offset=r.offset - 8), FormatError, "op payloads end at"),
        (lambda r: replace(r, offset=r.offset + 8, length=r.length - 8), FormatError, "op payloads end at"),
        (lambda r: replace(r, length=r.length - 8), FormatError, "ends at payload offset"),
    ],
    ids=["starts-inside-the-op-payloads", "starts-after-them", "ends-before-the-payload"],
)
def test_a_misplaced_index_is_refused_with_the_op_table(
    tmp_path: Path, signing_key: KeyPair, change: Any, error: type[Exception], message: str
) -> None:
    data = build(tmp_path, signing_key, image_bytes(3 * MiB), chunk=256 * KiB)
    _, m, _, _ = split(data)
    hostile = _resigned(data, signing_key, ref=change(m.block_index))
    reader = BundleReader(io.BytesIO(hostile))
    bundle = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(error, match=message):
        reader.read_op_table(bundle)


def test_an_index_with_an_entry_too_few_or_too_many_is_refused(tmp_path: Path, signing_key: KeyPair) -> None:
    data = build(tmp_path, signing_key, image_bytes(3 * MiB), chunk=256 * KiB)
    _, m, _, payload = split(data)
    ref = m.block_index
    assert ref is not None
    for entries in (payload[ref.offset : -8], payload[ref.offset :] + bytes(8)):
        body = payload[: ref.offset] + entries
        new = BlockIndexRef(ref.offset, len(entries), hashlib.sha256(entries).hexdigest())
        with pytest.raises(FormatError, match=r"REPLACE ops have \d+ blocks"):
            _read(_resigned(data, signing_key, ref=new, payload=body), signing_key)


def test_an_index_in_a_bundle_without_replace_ops_is_refused(signing_key: KeyPair) -> None:
    ops = [Op(OpType.ZERO, 0, 8192)]
    entries = bytes(16)
    ref = BlockIndexRef(0, 16, hashlib.sha256(entries).hexdigest())
    data = assemble(replace(manifest_for(ops, 16), block_index=ref), ops, entries, [signing_key.key])
    with pytest.raises(FormatError, match="without REPLACE ops"):
        _read(data, signing_key)


def test_damaged_index_bytes_are_refused_by_their_pinned_hash(tmp_path: Path, signing_key: KeyPair) -> None:
    data = bytearray(build(tmp_path, signing_key, image_bytes(3 * MiB)))
    data[-1] ^= 1
    with pytest.raises(HashMismatchError, match="block index"):
        _read(bytes(data), signing_key)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"offset": 0, "length": 8, "sha256": "0" * 64, "extra": 1}, "unknown key 'extra'"),
        ({"offset": 0, "length": 8}, r"block_index\.sha256 is missing"),
        ({"offset": -1, "length": 8, "sha256": "0" * 64}, r"block_index\.offset = -1 is outside"),
        ({"offset": 0, "length": 0, "sha256": "0" * 64}, r"block_index\.length = 0 is outside"),
        ({"offset": 0, "length": 8, "sha256": "XY"}, "not a lowercase SHA-256"),
        ([1, 2], "block_index is not an object"),
    ],
)
def test_malformed_block_index_keys_are_refused_naming_the_key(value: Any, message: str) -> None:
    doc = json.loads(manifest_for([Op(OpType.ZERO, 0, 4096)], 0).encode())
    doc["block_index"] = value
    with pytest.raises(FormatError, match=message):
        parse(json.dumps(doc).encode())


def test_more_blocks_than_the_bound_are_refused() -> None:
    op = Op(OpType.REPLACE, 0, 4 * MiB, 0, 100)
    ops = [op] * (blockindex.MAX_INDEX_BLOCKS // 1024 + 1)
    blocks = len(ops) * 1024
    with pytest.raises(BoundsError, match="block index blocks"):
        blockindex.check_index(ops, 100 * len(ops), 8 * blocks, 100 * len(ops), 100 * len(ops) + 8 * blocks)


@pytest.mark.parametrize("chunk", [4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB])
def test_plan_full_cuts_replace_runs_into_chunks_and_keeps_zero_runs_whole(chunk: int) -> None:
    image = image_bytes(6 * MiB + 4096)
    planned = list(plan_full(image, len(image), chunk))
    assert sum(p.dst_length for p in planned) == len(image)
    assert all(p.dst_length <= chunk for p in planned if p.type is OpType.REPLACE)
    zeros = [p for p in planned if p.type is OpType.ZERO]
    assert [(p.dst_offset, p.dst_length) for p in zeros] == [(MiB, MiB)]


@pytest.mark.parametrize("chunk", [0, 2048, 3 * 4096, 8 * MiB])
def test_a_chunk_size_that_is_no_power_of_two_from_4k_to_4m_is_refused(
    tmp_path: Path, signing_key: KeyPair, chunk: int
) -> None:
    with pytest.raises(OptionError, match="--chunk"):
        build(tmp_path, signing_key, image_bytes(2 * MiB), chunk=chunk)
    assert not (tmp_path / "out.otab").exists()


def test_the_cli_reads_chunk_sizes_with_units_and_refuses_garbage(
    tmp_path: Path, signing_key: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "image.img"
    src.write_bytes(image_bytes(2 * MiB + 4096))
    base = ["create", "--image", str(src), "--key", str(signing_key.private_path), "--version", "1",
            "--security-version", "1", "--compatible", "b", "--level", "1", "-o", str(tmp_path / "o.otab")]
    assert bundle_main([*base, "--chunk", "128K"]) == 0
    _, _, ops, _ = split((tmp_path / "o.otab").read_bytes())
    assert max(op.dst_length for op in ops if op.type is OpType.REPLACE) == 128 * KiB
    assert bundle_main([*base, "--chunk", "lots", "--force"]) != 0
    assert "is not a size such as 64K" in capsys.readouterr().err


def test_index_entries_are_the_truncated_sha256_of_each_block() -> None:
    block = zstandard.ZstdCompressor().compress(b"x" * 9000)[:4096].ljust(4096, b"\0")
    assert blockindex.block_hash(block) == hashlib.sha256(block).digest()[:8]


def test_an_adaptive_base_cuts_replace_runs_where_held_blocks_meet_new_ones() -> None:
    image = image_bytes(3 * MiB)
    new = {5, 6, 7, 600, 700}  # block numbers the likely base does not hold
    new_blocks = {image[b * 4096 : (b + 1) * 4096] for b in new}
    planned = list(plan_full(image, len(image), 4 * MiB, lambda block: bytes(block) not in new_blocks))
    assert sum(p.dst_length for p in planned) == len(image)
    replaced = [(p.dst_offset // 4096, p.dst_length // 4096) for p in planned if p.type is OpType.REPLACE]
    assert (5, 3) in replaced
    assert (600, 1) in replaced
    assert (700, 1) in replaced
    for first, count in replaced:  # no chunk mixes held and new blocks
        assert len({b in new for b in range(first, first + count)}) == 1


def test_an_adaptive_base_for_a_delta_image_or_a_missing_file_is_refused(tmp_path: Path, signing_key: KeyPair) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(image_bytes(2 * MiB, seed=5))
    with pytest.raises(OptionError, match=r"--adaptive-base: .*is a delta"):
        build(tmp_path, signing_key, image_bytes(2 * MiB), base={"rootfs": other}, adaptive_base={"rootfs": other})
    with pytest.raises(OptionError, match=r"--adaptive-base: .*No such file"):
        build(tmp_path, signing_key, image_bytes(2 * MiB), adaptive_base={"rootfs": tmp_path / "gone.img"})


def test_inspect_shows_the_block_index(
    tmp_path: Path, signing_key: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    build(tmp_path, signing_key, image_bytes(2 * MiB + 4096), chunk=64 * KiB)
    capsys.readouterr()
    assert bundle_main(["inspect", str(tmp_path / "out.otab"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    blocks = sum(-(-op["dst_length"] // 4096) for op in info["operations"] if op["type"] == "REPLACE")
    assert info["block_index"]["length"] == 8 * blocks
    assert bundle_main(["inspect", str(tmp_path / "out.otab")]) == 0
    assert f"{blocks} blocks (adaptive download)" in capsys.readouterr().out
