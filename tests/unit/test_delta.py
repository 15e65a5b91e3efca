"""Delta bundles: the planner's choices, the executor's payloads, the one
op-execution function (`bundler.format.apply.apply_op`) on real and hostile
delta ops. Hostile ops are made by the real executor, then altered and signed
again, so each one passes every check except the one it targets; each is
refused with its own error before its extent is written."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bundler.build import BuildError, BundleSpec, build_full
from bundler.executor import Inputs, make_op
from bundler.format.apply import NoSource, SourceError, apply_op
from bundler.format.deflate import Codec
from bundler.format.errors import BoundsError, FormatError, HashMismatchError
from bundler.format.manifest import ImageEntry
from bundler.format.ops import (
    MAX_DELTA_WINDOW,
    DictExtent,
    Op,
    OpType,
    Origin,
    pack_delta,
    parse_delta,
)
from bundler.format.reader import BundleReader
from bundler.format.signing import verify
from bundler.planner import Planned, Unit, plan_delta
from bundler.streams import find_streams
from tests.unit.conftest import KeyPair, SimSlot, assemble, manifest_for, stream_install

MiB = 1 << 20


class BytesSource:
    """An ExtentSource over a base image in memory and the slot being written."""

    def __init__(self, base: bytes, slot: SimSlot) -> None:
        self.base = base
        self.slot = slot
        self.reads: list[tuple[Origin, int, int]] = []

    def readinto(self, origin: Origin, offset: int, buf: memoryview, /) -> None:
        self.reads.append((origin, offset, len(buf)))
        data = self.base if origin is Origin.BASE else bytes(self.slot.data)
        piece = data[offset : offset + len(buf)]
        if len(piece) != len(buf):
            raise SourceError("short read", region="source")
        buf[:] = piece


class Images:
    """An ExtentSource over a base and a target image in memory, both fixed."""

    def __init__(self, base: bytes, target: bytes) -> None:
        self.images = {Origin.BASE: base, Origin.TARGET: target}

    def readinto(self, origin: Origin, offset: int, buf: memoryview, /) -> None:
        buf[:] = self.images[origin][offset : offset + len(buf)]


def text_like(rng: random.Random, n: int) -> bytes:
    """Compressible, varied bytes (words from a small vocabulary, some random binary)."""
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
        if rng.random() < 0.01:
            out += rng.randbytes(rng.randint(8, 64))
    return bytes(out[:n])


@pytest.fixture(scope="module")
def pair() -> tuple[bytes, bytes]:
    """v1 and v2 of a 3 MiB image: v2 moves a 256 KiB file, edits (and shifts) another
    stretch, zeroes a region and keeps the rest in place."""
    rng = random.Random(7)
    v1 = bytearray(text_like(rng, 3 * MiB))
    v1[2 * MiB : 2 * MiB + 256 * 1024] = bytes(256 * 1024)
    v2 = bytearray(v1)
    moved = bytes(v1[256 * 1024 : 512 * 1024])
    v2[1536 * 1024 : 1792 * 1024] = moved  # a file written to new blocks
    stretch = bytearray(v1[1 * MiB : 1 * MiB + 128 * 1024])
    stretch[1000:1000] = b"inserted bytes shift what follows"
    v2[1 * MiB : 1 * MiB + 128 * 1024] = stretch[: 128 * 1024]
    v2[2688 * 1024 : 2816 * 1024] = bytes(128 * 1024)
    return bytes(v1), bytes(v2)


# --- the planner ------------------------------------------------------------


def test_planner_copies_moved_blocks_and_deltas_changed_ones(pair: tuple[bytes, bytes]) -> None:
    v1, v2 = pair
    planned = list(plan_delta(v2, len(v2), v1, len(v1)))
    assert sum(p.dst_length for p in planned) == len(v2)
    copies = [p for p in planned if p.type is OpType.SOURCE_COPY]
    moved = next(p for p in copies if p.dst_offset <= 1536 * 1024 < p.dst_offset + p.dst_length)
    assert moved.src_offset + (1536 * 1024 - moved.dst_offset) == 256 * 1024, "copied from where the file was"
    deltas = [p for p in planned if p.type is OpType.DELTA]
    edited = next(p for p in deltas if p.dst_offset <= 1 * MiB < p.dst_offset + p.dst_length)
    assert any(u.origin is Origin.BASE and u.offset <= 1 * MiB < u.offset + u.length for u in edited.dictionary)
    zeros = [p for p in planned if p.type is OpType.ZERO]
    assert any(p.dst_offset <= 2688 * 1024 and p.dst_offset + p.dst_length >= 2816 * 1024 for p in zeros)


def test_planner_takes_dictionaries_from_target_already_written() -> None:
    rng = random.Random(3)
    base = rng.randbytes(512 * 1024)
    fresh = text_like(rng, 256 * 1024)  # new in v2, and written twice (the second slightly edited)
    again = bytearray(fresh)
    again[5000:5010] = b"0123456789"
    target = base[: 256 * 1024] + fresh + base[256 * 1024 :] + bytes(again)
    planned = list(plan_delta(target, len(target), base, len(base)))
    first = next(p for p in planned if p.dst_offset == 256 * 1024)
    assert first.type is OpType.REPLACE, "nothing like it in the base"
    last = planned[-1]
    assert (last.type, last.dst_offset) == (OpType.DELTA, 768 * 1024)
    assert any(u.origin is Origin.TARGET and u.offset + u.length <= last.dst_offset for u in last.dictionary)


def raw_unit(offset: int, length: int, origin: Origin = Origin.BASE) -> Unit:
    return Unit(origin, offset, length, Codec.RAW, length)


def test_executor_keeps_a_delta_only_when_it_is_smaller(pair: tuple[bytes, bytes]) -> None:
    v1, v2 = pair
    inputs = Inputs(v2, v1)
    useless = Planned(OpType.DELTA, 0, 64 * 1024, dictionary=(raw_unit(2 * MiB, 64 * 1024),))  # zeros
    op, payload = make_op(useless, replace(inputs, target=bytes(random.Random(1).randbytes(64 * 1024))), 3)
    assert op.type is OpType.REPLACE
    good = Planned(OpType.DELTA, 1 * MiB, 128 * 1024, dictionary=(raw_unit(1 * MiB, 192 * 1024),))
    op, payload = make_op(good, inputs, 3)
    assert op.type is OpType.DELTA
    _, frame = make_op(Planned(OpType.REPLACE, 1 * MiB, 128 * 1024), inputs, 3)
    assert len(payload) < len(frame) / 10


# --- building and applying ----------------------------------------------------


def build_delta(tmp_path: Path, key: KeyPair, v1: bytes, v2: bytes) -> bytes:
    base, image, out = tmp_path / "v1.img", tmp_path / "v2.img", tmp_path / "delta.otab"
    base.write_bytes(v1)
    image.write_bytes(v2)
    spec = BundleSpec(image, key.private_path, "2.0", 1, "test-board", level=3, threads=2, base={"rootfs": base})
    build_full(spec, out)
    return out.read_bytes()


def test_delta_bundle_rebuilds_the_target_from_the_base(
    tmp_path: Path, signing_key: KeyPair, pair: tuple[bytes, bytes]
) -> None:
    v1, v2 = pair
    data = build_delta(tmp_path, signing_key, v1, v2)
    slot = SimSlot()
    source = BytesSource(v1, slot)
    verified = stream_install(data, signing_key.keyring, slot, source)
    assert bytes(slot.data) == v2
    image = verified.manifest.images[0]
    assert (image.base_sha256, image.base_size) == (hashlib.sha256(v1).hexdigest(), len(v1))
    assert {o for o, _, _ in source.reads} >= {Origin.BASE}
    full = tmp_path / "full.otab"
    build_full(BundleSpec(tmp_path / "v2.img", signing_key.private_path, "2.0", 1, "test-board", level=3), full)
    assert len(data) < full.stat().st_size / 4


def test_a_delta_build_refuses_an_image_that_changed_while_it_was_built(
    tmp_path: Path, signing_key: KeyPair, pair: tuple[bytes, bytes]
) -> None:
    v1, v2 = pair
    base, image, out = tmp_path / "v1.img", tmp_path / "v2.img", tmp_path / "delta.otab"
    base.write_bytes(v1)
    image.write_bytes(v2)
    spec = BundleSpec(
        image, signing_key.private_path, "2.0", 1, "test-board", level=3, threads=2, base={"rootfs": base}
    )

    def progress(done: int, total: int) -> None:  # the image is rewritten once its ops are under way
        with image.open("r+b") as f:
            f.write(b"changed")

    with pytest.raises(BuildError, match="the image changed while building"):
        build_full(spec, out, progress)
    assert not out.exists()


def test_delta_install_refuses_a_base_that_differs(
    tmp_path: Path, signing_key: KeyPair, pair: tuple[bytes, bytes]
) -> None:
    v1, v2 = pair
    data = build_delta(tmp_path, signing_key, v1, v2)
    other = bytearray(v1)
    other[300 * 1024] ^= 1  # one bit of the moved file differs on this device
    slot = SimSlot()
    with pytest.raises(HashMismatchError, match=r"op 0: base source extent at 0 \(\+1048576\) hash mismatch"):
        stream_install(data, signing_key.keyring, slot, BytesSource(bytes(other), slot))
    assert slot.written == [], "the first op copies the changed block: nothing was written"


# --- hostile delta ops ----------------------------------------------------------

BASE = random.Random(11).randbytes(256 * 1024)
# TARGET[64 KiB:128 KiB) is BASE[128 KiB:192 KiB) with a few bytes changed: a DELTA of a few bytes.
TARGET = BASE[: 64 * 1024] + BASE[128 * 1024 : 160 * 1024] + b"edited" + BASE[160 * 1024 + 6 : 192 * 1024]


def delta_op(offset: int = 128 * 1024, length: int = 64 * 1024) -> tuple[Op, bytes]:
    planned = Planned(OpType.DELTA, 64 * 1024, 64 * 1024, dictionary=(raw_unit(offset, length),))
    op, payload = make_op(planned, Inputs(TARGET, BASE), 3)
    assert op.type is OpType.DELTA
    return op, payload


def signed(key: KeyPair, pieces: list[tuple[Op, bytes]], *, base_size: int = len(BASE)) -> bytes:
    """A signed one-image delta bundle from (op, payload) pieces: payload offsets and hashes
    fixed up, so only what a test changed on purpose is wrong."""
    ops: list[Op] = []
    cursor = 0
    for op, payload in pieces:
        if payload:
            digest = hashlib.sha256(payload).digest()
            ops.append(replace(op, payload_offset=cursor, payload_length=len(payload), payload_sha256=digest))
            cursor += len(payload)
        else:
            ops.append(op)
    size = sum(op.dst_length for op in ops)
    image = ImageEntry("rootfs", size, hashlib.sha256(TARGET[:size]).hexdigest(), 0, len(ops),
                       hashlib.sha256(BASE).hexdigest(), base_size)
    return assemble(manifest_for(ops, cursor, images=(image,)), ops, b"".join(p for _, p in pieces), [key.key])


def head() -> tuple[Op, bytes]:
    return make_op(Planned(OpType.SOURCE_COPY, 0, 64 * 1024, src_offset=0), Inputs(TARGET, BASE), 3)


def install(key: KeyPair, data: bytes) -> SimSlot:
    slot = SimSlot()
    stream_install(data, key.keyring, slot, BytesSource(BASE, slot))
    return slot


def test_the_hostile_fixtures_install_when_left_alone(signing_key: KeyPair) -> None:
    slot = install(signing_key, signed(signing_key, [head(), delta_op()]))
    assert bytes(slot.data) == TARGET[: 128 * 1024]


def with_extents(op: Op, payload: bytes, extents: list[DictExtent]) -> tuple[Op, bytes]:
    delta = parse_delta(op, payload, 0, len(BASE))
    return replace(op, src_length=sum(e.produces for e in extents)), pack_delta(extents, (), bytes(delta.frame))


def extents_of(op: Op, payload: bytes) -> list[DictExtent]:
    return list(parse_delta(op, payload, 0, len(BASE)).extents)


def reframe(op: Op, payload: bytes, frame: bytes) -> tuple[Op, bytes]:
    return op, pack_delta(extents_of(op, payload), (), frame)


Hostile = Callable[[], tuple[list[tuple[Op, bytes]], dict[str, Any]]]


def lying_extent_hash() -> list[tuple[Op, bytes]]:
    op, payload = delta_op()
    [e] = extents_of(op, payload)
    return [head(), with_extents(op, payload, [replace(e, sha256=hashlib.sha256(b"other").digest())])]


def base_extent_past_the_end() -> list[tuple[Op, bytes]]:
    op, payload = delta_op()
    [e] = extents_of(op, payload)
    return [head(), with_extents(op, payload, [replace(e, offset=len(BASE) - 4096)])]  # 64 KiB, 4 KiB left


def target_extent_over_its_own_destination() -> list[tuple[Op, bytes]]:
    op, payload = delta_op()
    [e] = extents_of(op, payload)
    return [head(), with_extents(op, payload, [replace(e, origin=Origin.TARGET, offset=32 * 1024)])]


def overlapping_extents() -> list[tuple[Op, bytes]]:
    op, payload = delta_op()
    [e] = extents_of(op, payload)
    half = 32 * 1024
    first = replace(e, length=half, out_length=half)
    twice = [first, replace(first, offset=e.offset + half // 2)]
    return [head(), with_extents(op, payload, twice)]


def frame_of_the_wrong_size() -> list[tuple[Op, bytes]]:
    op, payload = delta_op()
    d = zstandard.ZstdCompressionDict(BASE[128 * 1024 : 192 * 1024], dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    short = zstandard.ZstdCompressor(level=3, dict_data=d).compress(TARGET[64 * 1024 : 127 * 1024])
    return [head(), reframe(op, payload, short)]


def window_beyond_the_bound() -> list[tuple[Op, bytes]]:
    op, payload = delta_op()
    d = zstandard.ZstdCompressionDict(BASE[128 * 1024 : 192 * 1024], dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=(2 * MAX_DELTA_WINDOW).bit_length() - 1)
    stream = zstandard.ZstdCompressor(compression_params=params, dict_data=d).compressobj()
    wide = stream.compress(TARGET[64 * 1024 : 128 * 1024]) + stream.flush()  # size unknown: the window stays
    assert wide[4] & 0xE0 == 0, "no content size, not single-segment: a window descriptor follows"
    # Declare the content size (4-byte field after the window descriptor), as the format demands.
    declared = wide[:4] + bytes([wide[4] | 0x80]) + wide[5:6] + (64 * 1024).to_bytes(4, "little") + wide[6:]
    assert zstandard.get_frame_parameters(declared).window_size == 2 * MAX_DELTA_WINDOW
    return [head(), reframe(op, payload, declared)]


def dictionary_length_that_lies() -> list[tuple[Op, bytes]]:
    op, payload = delta_op()
    return [head(), (replace(op, src_length=op.src_length - 1), payload)]


HOSTILE: list[tuple[str, Callable[[], list[tuple[Op, bytes]]], type[Exception], str]] = [
    ("lying extent hash", lying_extent_hash, HashMismatchError, r"op 1: base source extent at 131072 .* mismatch"),
    ("base extent past the end", base_extent_past_the_end, BoundsError, r"outside the base image"),
    ("target extent over its destination", target_extent_over_its_own_destination, BoundsError,
     r"outside the target written before this op"),
    ("overlapping extents", overlapping_extents, FormatError, r"dictionary extents overlap at BASE offset 147456"),
    ("frame of the wrong size", frame_of_the_wrong_size, FormatError, r"frame declares 64512 bytes, op has 65536"),
    ("window beyond the bound", window_beyond_the_bound, BoundsError, r"zstd window"),
    ("dictionary length that lies", dictionary_length_that_lies, FormatError, r"hold 65536 bytes, op says 65535"),
]


@pytest.mark.parametrize(("name", "make", "error", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_delta_op_is_refused_before_its_extent_is_written(
    signing_key: KeyPair, name: str, make: Callable[[], list[tuple[Op, bytes]]], error: type[Exception], message: str
) -> None:
    slot = SimSlot()
    with pytest.raises(error, match=message):
        stream_install(signed(signing_key, make()), signing_key.keyring, slot, BytesSource(BASE, slot))
    assert slot.written == [0], "the op before it was written; the hostile one was not"


def test_source_copy_outside_the_base_is_refused_with_the_op_table(signing_key: KeyPair) -> None:
    op, _ = head()
    data = signed(signing_key, [(replace(op, src_offset=len(BASE) - 4096), b"")])
    reader = BundleReader(io.BytesIO(data))
    verified = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(BoundsError, match=r"op 0 \(source outside the 262144-byte base image\)"):
        reader.read_op_table(verified)


def test_source_copy_from_a_base_that_differs_fails_its_hash(signing_key: KeyPair) -> None:
    op, _ = head()
    data = signed(signing_key, [(replace(op, src_offset=4096), b"")])
    slot = SimSlot()
    with pytest.raises(HashMismatchError, match=r"op 0: base source extent at 4096"):
        stream_install(data, signing_key.keyring, slot, BytesSource(BASE, slot))
    assert slot.written == []


def test_delta_ops_in_an_image_without_a_base_are_refused(signing_key: KeyPair) -> None:
    op, payload = delta_op()
    data = signed(signing_key, [head(), (op, payload)])
    raw = bytearray(data)
    reader = BundleReader(io.BytesIO(bytes(raw)))
    verified = verify(reader.read_head(), signing_key.keyring)
    entry = replace(verified.manifest.images[0], base_sha256=None, base_size=None)
    ops = reader.read_op_table(verified)
    bare = assemble(manifest_for(list(ops), verified.manifest.payload_length, images=(entry,)), list(ops),
                    payload, [signing_key.key])
    reader = BundleReader(io.BytesIO(bare))
    with pytest.raises(FormatError, match=r"op 0: SOURCE_COPY in an image without a base image"):
        reader.read_op_table(verify(reader.read_head(), signing_key.keyring))


def test_apply_op_without_a_source_refuses_source_reads() -> None:
    op, _ = head()
    with pytest.raises(SourceError, match="no base to read from"):
        apply_op(op, None, 0, NoSource(), len(BASE))


# --- deflate-aware deltas -------------------------------------------------------


def zlib_blocks(rng: random.Random, contents: list[bytes]) -> bytes:
    """Back-to-back zlib streams (level 9, as squashfs writes its blocks) with short raw headers."""
    return b"".join(rng.randbytes(2) + zlib.compress(c, 9) for c in contents)


@pytest.fixture(scope="module")
def compressed_pair() -> tuple[bytes, bytes]:
    rng = random.Random(5)
    files = [text_like(rng, 96 * 1024) for _ in range(12)]
    edited = list(files)
    edited[3] = edited[3][:5000] + b"patched" + edited[3][5000:]
    edited[7] = edited[7][:100] + edited[7][300:]
    gz = gzip.compress(files[0] * 2, compresslevel=9, mtime=0)  # a .gz file, as in an ext4 image
    v1 = zlib_blocks(random.Random(1), files) + gz
    v2 = b"shifted by a few bytes" + zlib_blocks(random.Random(2), edited) + gzip.compress(
        edited[3] * 2, compresslevel=9, mtime=0
    )
    return v1, v2


def test_streams_the_device_deflate_reproduces_are_found_and_others_stay_raw() -> None:
    rng = random.Random(9)
    content = text_like(rng, 50_000)
    mine = zlib.compress(content, 9)
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_FILTERED)  # a deflate the device does not run
    other = c.compress(content) + c.flush()
    assert other != mine
    data = b"x" * 100 + mine + b"y" * 100 + other
    found = find_streams(data)
    assert [(s.offset, s.length, s.codec, s.level, s.mem_level) for s in found] == [
        (100, len(mine), Codec.ZLIB, 9, 8)
    ]
    assert len(find_streams(data, verify=False)) == 2, "both inflate: both may serve as a dictionary"


def test_deflate_aware_delta_carries_uncompressed_content_and_rebuilds_exact_bytes(
    tmp_path: Path, signing_key: KeyPair, compressed_pair: tuple[bytes, bytes]
) -> None:
    v1, v2 = compressed_pair
    planned = list(plan_delta(v2, len(v2), v1, len(v1)))
    deltas = [p for p in planned if p.type is OpType.DELTA]
    assert any(piece.codec is Codec.ZLIB for p in deltas for piece in p.pieces)
    assert any(piece.codec is Codec.DEFLATE for p in deltas for piece in p.pieces), "the gzip member's body"
    assert any(u.codec is Codec.ZLIB for p in deltas for u in p.dictionary), "inflated base blocks as dictionary"
    data = build_delta(tmp_path, signing_key, v1, v2)
    slot = SimSlot()
    stream_install(data, signing_key.keyring, slot, BytesSource(v1, slot))
    assert bytes(slot.data) == v2
    assert len(data) < len(zlib.compress(v2, 9)) / 5, "far below the compressed streams themselves"


def deflate_aware_op(compressed_pair: tuple[bytes, bytes]) -> tuple[Op, bytes, bytes]:
    v1, v2 = compressed_pair
    planned = next(p for p in plan_delta(v2, len(v2), v1, len(v1)) if p.pieces)
    op, payload = make_op(planned, Inputs(v2, v1), 3)
    assert op.type is OpType.DELTA
    return op, payload, v1


def test_a_piece_that_recompresses_differently_is_refused(compressed_pair: tuple[bytes, bytes]) -> None:
    op, payload, v1 = deflate_aware_op(compressed_pair)
    delta = parse_delta(op, payload, 0, len(v1))
    k = next(i for i, p in enumerate(delta.pieces) if p.codec is Codec.ZLIB)
    pieces = list(delta.pieces)
    pieces[k] = replace(pieces[k], level=1)  # the content deflated at another level: other bytes
    hostile = pack_delta(delta.extents, pieces, bytes(delta.frame))
    with pytest.raises(FormatError, match=r"op 0: output piece \d+ recompresses to \d+ bytes"):
        apply_op(op, hostile, 0, InMemory(v1), len(v1))


def test_a_stream_extent_that_inflates_to_another_length_is_refused(compressed_pair: tuple[bytes, bytes]) -> None:
    op, payload, v1 = deflate_aware_op(compressed_pair)
    delta = parse_delta(op, payload, 0, len(v1))
    k = next(i for i, e in enumerate(delta.extents) if e.codec is Codec.ZLIB)
    extents = list(delta.extents)
    extents[k] = replace(extents[k], out_length=extents[k].produces - 1)
    hostile = pack_delta(extents, delta.pieces, bytes(delta.frame))
    with pytest.raises(FormatError, match=rf"op 0: dictionary extent {k}: inflates to"):
        apply_op(replace(op, src_length=op.src_length - 1), hostile, 0, InMemory(v1), len(v1))


class InMemory:
    def __init__(self, base: bytes) -> None:
        self.base = base

    def readinto(self, origin: Origin, offset: int, buf: memoryview, /) -> None:
        assert origin is Origin.BASE
        buf[:] = self.base[offset : offset + len(buf)]


def test_a_new_compressed_file_is_a_deflate_aware_delta_without_dictionary(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    rng = random.Random(8)
    base = rng.randbytes(256 * 1024)
    fresh = zlib_blocks(rng, [text_like(rng, 64 * 1024) for _ in range(3)])  # nothing like it in the base
    target = base + fresh
    planned = [p for p in plan_delta(target, len(target), base, len(base)) if p.dst_offset >= len(base)]
    assert [(p.type, p.dictionary) for p in planned] == [(OpType.DELTA, ())]
    assert any(piece.codec is Codec.ZLIB for piece in planned[0].pieces)
    data = build_delta(tmp_path, signing_key, base, target)
    slot = SimSlot()
    stream_install(data, signing_key.keyring, slot, BytesSource(base, slot))
    assert bytes(slot.data) == target


def test_a_delta_needing_more_ops_than_a_device_holds_is_refused_and_nothing_is_written(
    tmp_path: Path, signing_key: KeyPair, pair: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bundler.build  # noqa: PLC0415

    monkeypatch.setattr(bundler.build, "MAX_DELTA_OPS", 2)  # the corpus pair's ops are far below the real bound
    with pytest.raises(BuildError, match=r"the delta needs \d+ ops; a delta bundle holds at most 2 .*full bundle"):
        build_delta(tmp_path, signing_key, *pair)
    assert not (tmp_path / "delta.otab").exists()
