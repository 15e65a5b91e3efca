"""Delta planning choices that keep bundles small and builds short: dictionary
extents merged where contiguous (best last), dictionaries from the target only
where it changed, and stream verification that finds every level the device's
deflate reproduces (rejecting the others cheaply, without missing any)."""

from __future__ import annotations

import itertools
import random
import zlib
from pathlib import Path

from bundler.format.deflate import Codec, deflate
from bundler.format.ops import MAX_DICT, OpType, Origin
from bundler.planner import Planned, Unit, _clash, _merged, plan_delta
from bundler.streams import find_streams
from tests.unit.conftest import KeyPair, SimSlot, stream_install
from tests.unit.test_delta import BytesSource, build_delta, text_like

KiB = 1 << 10


def raw(offset: int, length: int, origin: Origin = Origin.BASE) -> Unit:
    return Unit(origin, offset, length, Codec.RAW, length)


def test_contiguous_raw_units_become_one_extent_with_the_best_last() -> None:
    stream = Unit(Origin.BASE, 192 * KiB, 1000, Codec.ZLIB, 4000)
    chosen = [
        (9, raw(64 * KiB, 64 * KiB)),
        (3, raw(0, 64 * KiB)),
        (5, raw(128 * KiB, 64 * KiB)),
        (7, stream),
        (4, raw(192 * KiB + 1000, 64 * KiB)),  # after the stream: not contiguous with a raw unit
        (8, raw(64 * KiB, 64 * KiB, Origin.TARGET)),  # the same offset in the other image
    ]
    assert _merged(chosen) == (
        raw(192 * KiB + 1000, 64 * KiB),
        stream,
        raw(64 * KiB, 64 * KiB, Origin.TARGET),
        raw(0, 192 * KiB),  # scored by its best region (9)
    )


def test_overlapping_units_never_become_overlapping_extents() -> None:
    stream = Unit(Origin.BASE, 100 * KiB, 1000, Codec.ZLIB, 4000)
    assert _clash(stream, raw(96 * KiB, 64 * KiB)), "a stream offered inflated and raw: one of them"
    assert not _clash(stream, raw(100 * KiB, 64 * KiB, Origin.TARGET))
    assert not _clash(raw(0, 64 * KiB), raw(60 * KiB, 8 * KiB)), "overlapping raw units merge"
    chosen = [(5, raw(0, 64 * KiB)), (9, raw(60 * KiB, 8 * KiB)), (7, stream)]
    assert _merged(chosen) == (stream, raw(0, 68 * KiB))


def test_a_base_stream_the_target_holds_unreproduced_is_matched_as_raw_bytes() -> None:
    """A compressed file the device cannot recompress stays raw bytes in the target; where
    the base holds the same bytes (moved), they are copied from it (bundler.moved) or, where
    that run is too short, in the dictionary as raw bytes."""
    rng = random.Random(17)
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 8, zlib.Z_FILTERED)  # not what the device runs
    member = c.compress(text_like(rng, 300 * KiB)) + c.flush()
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + member + bytes(8)
    base = rng.randbytes(64 * KiB) + gz + rng.randbytes(64 * KiB)
    target = b"shifted" + gz + rng.randbytes(32 * KiB)
    assert [s.codec for s in find_streams(base, verify=False)] == [Codec.DEFLATE]
    assert find_streams(target) == [], "stays raw in the target"
    plan = list(plan_delta(target, len(target), base, len(base)))
    planned = [p for p in plan if p.type is OpType.DELTA]
    raw_held = [(u.offset, u.offset + u.length) for p in planned for u in p.dictionary if u.codec is Codec.RAW]
    raw_held += [(p.src_offset, p.src_offset + p.dst_length) for p in plan if p.type is OpType.SOURCE_COPY]
    covered = sum(min(b, 64 * KiB + len(gz)) - max(a, 64 * KiB) for a, b in raw_held if b > 64 * KiB)
    assert covered >= len(gz) * 0.9


def moved_and_edited(rng: random.Random) -> tuple[bytes, bytes]:
    """A 2 MiB base; the target holds an edited copy of its first MiB, shifted by 3 bytes,
    then the base's second MiB unchanged in place."""
    v1 = text_like(rng, 2 << 20)
    edited = bytearray(v1[: 1 << 20])
    for at in range(0, len(edited), 50 * KiB):
        edited[at : at + 20] = rng.randbytes(20)
    v2 = (b"new" + bytes(edited))[: 1 << 20] + v1[1 << 20 :]
    return v1, v2


def test_a_delta_of_moved_data_takes_few_extents_and_rebuilds_the_target(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    v1, v2 = moved_and_edited(random.Random(11))
    planned = list(plan_delta(v2, len(v2), v1, len(v1)))
    deltas = [p for p in planned if p.type is OpType.DELTA]
    assert deltas
    for p in deltas:
        assert sum(u.produces for u in p.dictionary) <= MAX_DICT
        spans = sorted((u.origin, u.offset, u.offset + u.length) for u in p.dictionary if u.codec is Codec.RAW)
        for (o1, _, end), (o2, start, _) in itertools.pairwise(spans):
            assert (o1, end) != (o2, start), "contiguous raw units are one extent"
    assert max(len(p.dictionary) for p in deltas) <= 2, "the moved MiB is one or two extents, not 16"
    data = build_delta(tmp_path, signing_key, v1, v2)
    slot = SimSlot()
    stream_install(data, signing_key.keyring, slot, BytesSource(v1, slot))
    assert bytes(slot.data) == v2


def test_dictionaries_take_target_data_only_where_the_target_changed() -> None:
    rng = random.Random(12)
    base = rng.randbytes(512 * KiB)
    fresh = text_like(rng, 256 * KiB)
    again = bytearray(fresh)
    again[9000:9010] = b"0123456789"
    # the base's first half copied in place, new text, the base's second half, the text again
    target = base[: 256 * KiB] + fresh + base[256 * KiB :] + bytes(again)
    planned = list(plan_delta(target, len(target), base, len(base)))
    changed = [(p.dst_offset, p.dst_offset + p.dst_length) for p in planned
               if p.type in (OpType.DELTA, OpType.REPLACE)]
    from_target = [u for p in planned for u in p.dictionary if u.origin is Origin.TARGET]
    assert from_target, "the repeated text is delta'd against its first copy"
    for u in from_target:
        assert any(a <= u.offset and u.offset + u.length <= b for a, b in changed), (u, changed)


def test_streams_made_at_any_level_and_memlevel_the_device_runs_are_found() -> None:
    rng = random.Random(13)
    made: list[tuple[Codec, int, int, bytes]] = []
    image = bytearray(b"\xee" * 100)
    for codec, level, mem_level in ((Codec.ZLIB, 9, 8), (Codec.ZLIB, 7, 9), (Codec.ZLIB, 8, 8),
                                    (Codec.ZLIB, 2, 9), (Codec.DEFLATE, 1, 8), (Codec.DEFLATE, 6, 9)):
        content = text_like(rng, 200 * KiB)
        packed = deflate(content, codec, level, mem_level)
        if codec is Codec.DEFLATE:  # a gzip member: header (XFL 4 or none), body, trailer
            xfl = 4 if level == 1 else 0
            packed = b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 3]) + packed + bytes(8)
        made.append((codec, level, mem_level, packed))
        image += packed + b"\xee" * 50
    found = find_streams(bytes(image))
    assert [s.codec for s in found] == [c for c, _, _, _ in made], "every stream found"
    assert [s.mem_level for s in found] == [m for _, _, m, _ in made]
    for s in found:  # the level found may differ where two levels make the same bytes
        content = zlib.decompress(bytes(image[s.offset : s.offset + s.length]), 15 if s.codec is Codec.ZLIB else -15)
        assert deflate(content, s.codec, s.level, s.mem_level) == image[s.offset : s.offset + s.length]


def test_a_stream_that_matches_only_until_its_end_is_not_taken() -> None:
    """A stream whose first blocks the deflate reproduces but whose end it does not
    (here: a different final block) stays raw bytes."""
    rng = random.Random(14)
    content = text_like(rng, 300 * KiB)
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 8)
    head = c.compress(content[:-1000])
    tail = c.flush(zlib.Z_FULL_FLUSH) + c.compress(content[-1000:]) + c.flush(zlib.Z_FINISH)
    stream = head + tail
    assert zlib.decompress(stream) == content
    assert stream != zlib.compress(content, 9)
    assert find_streams(b"\xee" * 10 + stream) == []
    assert len(find_streams(b"\xee" * 10 + stream, verify=False)) == 1


def test_planned_ops_cover_the_target_once() -> None:
    v1, v2 = moved_and_edited(random.Random(15))
    planned: list[Planned] = list(plan_delta(v2, len(v2), v1, len(v1)))
    at = 0
    for p in planned:
        assert p.dst_offset == at
        at += p.dst_length
    assert at == len(v2)


def no_anchor_bytes(rng: random.Random, n: int) -> bytes:
    """Random bytes the similarity search finds no feature in (no byte of either anchor set)."""
    alphabet = bytes(b for b in range(256) if b % 8 not in (3, 5))
    return bytes(rng.choice(alphabet) for _ in range(n))


def test_blocks_known_to_come_from_the_base_are_in_the_dictionary(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    """Runs too short for a SOURCE_COPY of their own join the delta, and the base extents
    they were found in join its dictionary even where no feature points there."""
    rng = random.Random(16)
    base = no_anchor_bytes(rng, 1 << 20)
    picks = sorted(rng.sample(range(0, 240), 12))
    # new data between the runs: enough content that the dictionary budget
    # (planner.DICT_PER_BYTE, DICT_MIN) holds every base region the runs lie in
    target = b"".join(base[p * 4096 : (p + 3) * 4096] + no_anchor_bytes(rng, 16384) for p in picks)
    planned = list(plan_delta(target, len(target), base, len(base)))
    assert [p.type for p in planned] == [OpType.DELTA]
    held = [(u.offset, u.offset + u.length) for u in planned[0].dictionary if u.origin is Origin.BASE]
    for p in picks:
        assert any(a <= p * 4096 and (p + 3) * 4096 <= b for a, b in held) or all(
            any(a <= q * 4096 < b for a, b in held) for q in range(p, p + 3)
        ), f"block {p} is in the dictionary"
    data = build_delta(tmp_path, signing_key, base, target)
    slot = SimSlot()
    stream_install(data, signing_key.keyring, slot, BytesSource(base, slot))
    assert bytes(slot.data) == target
    new, copied = 12 * 16384, 12 * 3 * 4096
    assert len(data) < new + copied / 8, "the copied blocks cost next to nothing"


def test_a_stream_that_moved_unchanged_stays_raw_bytes_and_a_changed_one_is_content() -> None:
    """A compressed block the base holds byte for byte (it only moved) is matched as raw
    bytes: no piece, nothing for the device to deflate, and the stream is not verified."""
    rng = random.Random(23)
    moved = zlib.compress(text_like(rng, 60 * KiB), 9)
    content = text_like(rng, 60 * KiB)
    old, new = zlib.compress(content, 9), zlib.compress(content[:30000] + b"edited" + content[30006:], 9)
    base = rng.randbytes(64 * KiB) + moved + bytes(1000) + old + rng.randbytes(64 * KiB)
    target = rng.randbytes(8 * KiB) + bytes(100) + moved + bytes(777) + new + rng.randbytes(8 * KiB)
    target += bytes(-len(target) % 4096)
    planned = list(plan_delta(target, len(target), base, len(base)))
    deltas = [p for p in planned if p.type is OpType.DELTA]
    streamed = {(p.dst_offset + sum(q.out_length for q in p.pieces[:k]), piece.codec)
                for p in deltas for k, piece in enumerate(p.pieces)}
    assert (target.index(new), Codec.ZLIB) in streamed, "the changed block travels as its content"
    assert not any(at == target.index(moved) for at, codec in streamed if codec is Codec.ZLIB)
    at, src = target.index(moved), base.index(moved)
    copied = any(p.type is OpType.SOURCE_COPY and p.dst_offset <= at < p.dst_offset + p.dst_length
                 and p.src_offset == src - (at - p.dst_offset) for p in planned)  # a run long enough to copy
    in_dictionary = any(u.codec is Codec.RAW and u.offset <= src < u.offset + u.length
                        for p in deltas for u in p.dictionary)
    assert copied or in_dictionary, "the moved block is copied, or its raw bytes are in a dictionary"
