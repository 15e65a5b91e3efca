"""X86-filtered DELTA ops (bundler.format.x86, docs/delta.md):

- the filter inverts exactly, for any bytes and any start, including opcodes
  packed so closely that their displacements overlap;
- a rebuilt executable whose code moved (calls into code before the change
  shift their displacements) becomes a smaller delta filtered, and the device
  rebuilds it byte for byte; data that is not code is never filtered;
- hostile X86 records (reserved bytes, a length change, a level, a wrong
  start) are refused or caught by the produced extent's hash, before anything
  of the op is written.
"""

from __future__ import annotations

import functools
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundler import executor
from bundler.executor import Inputs, _delta_frame, _delta_inputs, make_op
from bundler.format import x86
from bundler.format.apply import run_op
from bundler.format.deflate import Codec
from bundler.format.errors import FormatError, HashMismatchError
from bundler.format.ops import DictExtent, Op, OpType, Origin, Piece, pack_delta, parse_delta
from bundler.planner import Planned, Unit, plan_delta
from tests.fixtures.synthetic import program
from tests.unit.test_delta import Images

KiB = 1024


@pytest.fixture(autouse=True)
def x86_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundler's x86 filter is off by default (build time); these tests turn it on."""
    monkeypatch.setattr(executor, "X86_FILTER", True)


@given(st.binary(max_size=512), st.integers(0, (1 << 32) - 1))
@settings(max_examples=300, deadline=None)
def test_the_filter_inverts_any_bytes(tail: bytes, start: int) -> None:
    # Mostly opcodes and 00/FF bytes: instructions overlap and crowd each other everywhere.
    data = bytes(b"\xe8\xe9\x00\xff"[b % 4] if b < 200 else b for b in tail)
    assert x86.decode(x86.encode(data, start), start) == data


def test_the_filter_inverts_where_a_rewrite_would_change_an_earlier_opcodes_d3() -> None:
    # E8 at 0 sees d3 at 4, inside the displacement of the instruction at 1.
    data = b"\xe8\xe8\x10\x20\x30\x00" + bytes(20)
    encoded = x86.encode(data, 7)
    assert encoded == data, "the instruction at 1 is left as it is"
    assert x86.decode(encoded, 7) == data
    rng = random.Random(3)
    for _ in range(200):
        blob = bytes(rng.choice(b"\xe8\xe9\x00\xff\x01\x10") for _ in range(rng.randint(0, 300)))
        start = rng.randrange(1 << 32)
        assert x86.decode(x86.encode(blob, start), start) == blob


def test_the_filter_makes_a_relative_call_absolute() -> None:
    call = b"\xe8" + (0x100).to_bytes(4, "little", signed=True)
    encoded = x86.encode(bytes(16) + call, 1000)
    assert int.from_bytes(encoded[17:21], "little", signed=True) == 0x100 + 1000 + 16 + 5


def test_moved_code_becomes_a_smaller_filtered_delta_that_the_device_rebuilds() -> None:
    v1, v2 = program(5, 0), program(5, 3000)
    base = bytes(64 * KiB) + v1 + bytes(64 * KiB)
    target = bytes(256 * KiB) + v2  # the file also moved inside the image
    target += bytes(-len(target) % 4096)
    inputs = Inputs(target, base)
    planned = [p for p in plan_delta(target, len(target), base, len(base)) if p.type is OpType.DELTA]
    assert planned, "the moved program is delta'd against its old version"
    for p in planned:
        op, payload = make_op(p, inputs, 3)
        delta = parse_delta(op, payload, 0, len(base))
        assert [piece.codec for piece in delta.pieces] == [Codec.X86]
        assert any(e.codec is Codec.X86 for e in delta.extents)
        plain = pack_delta(*_unfiltered(p, inputs))
        assert len(payload) < 0.8 * len(plain), "filtered, the moved calls match"
        made = run_op(op, payload, 0, Images(base, target), len(base))
        assert made == target[op.dst_offset : op.dst_offset + op.dst_length]


def _unfiltered(p: Planned, inputs: Inputs) -> tuple[list[DictExtent], tuple[Piece, ...], bytes]:
    data = bytes(inputs.target[p.dst_offset : p.dst_offset + p.dst_length])
    extents, pieces, dictionary, content = _delta_inputs(p, inputs, data, filtered=False)
    return extents, pieces, _delta_frame(content, dictionary)


def test_data_that_is_not_code_is_not_filtered() -> None:
    rng = random.Random(9)
    base = rng.randbytes(512 * KiB)
    target = base[: 256 * KiB] + b"changed" + base[256 * KiB + 7 :]
    for p in plan_delta(target, len(target), base, len(base)):
        if p.type is OpType.DELTA:
            op, payload = make_op(p, Inputs(target, base), 3)
            delta = parse_delta(op, payload, 0, len(base))
            assert all(e.codec is not Codec.X86 for e in delta.extents)
            assert not delta.pieces


# --- hostile X86 records ----------------------------------------------------------

@functools.cache
def filtered_op() -> tuple[Op, bytes, bytes, bytes]:
    """(op, payload, base, target) of one X86-filtered DELTA."""
    v1, v2 = program(6, 0, 100), program(6, 2000, 100)
    base, target = v1, v2[: len(v2) // 4096 * 4096]
    p = Planned(OpType.DELTA, 0, len(target), dictionary=(Unit(Origin.BASE, 0, len(base), Codec.RAW, len(base)),))
    op, payload = make_op(p, Inputs(target, base), 3)
    assert parse_delta(op, payload, 0, len(base)).pieces[0].codec is Codec.X86
    return op, payload, base, target


def rebuilt(op: Op, payload: bytes, extents: list[DictExtent] | None = None, pieces: list[Piece] | None = None,
            extent_record: bytes | None = None) -> tuple[Op, bytes]:
    delta = parse_delta(op, payload, 0, 1 << 30)
    new = pack_delta(extents if extents is not None else list(delta.extents),
                     pieces if pieces is not None else list(delta.pieces), bytes(delta.frame))
    if extent_record is not None:
        new = new[:8] + extent_record + new[8 + 64 :]
    return op, new


def test_an_x86_extent_with_trailing_reserved_bytes_set_is_refused() -> None:
    op, payload, base, _ = filtered_op()
    record = bytearray(payload[8:72])
    record[7] = 1  # the last reserved byte after the u32 start
    op, bad = rebuilt(op, payload, extent_record=bytes(record))
    with pytest.raises(FormatError, match="dictionary extent 0 has an unknown origin, codec or reserved bytes"):
        run_op(op, bad, 0, Images(base, b""), len(base))


def test_an_x86_extent_that_changes_the_length_is_refused() -> None:
    op, payload, base, _ = filtered_op()
    [e] = parse_delta(op, payload, 0, len(base)).extents
    op, bad = rebuilt(op, payload, extents=[replace(e, out_length=e.length + 1)])
    with pytest.raises(FormatError, match=r"x86 dictionary extent 0 of \d+ bytes says it yields"):
        run_op(replace(op, src_length=e.length + 1), bad, 0, Images(base, b""), len(base))


@pytest.mark.parametrize("piece", [Piece(Codec.X86, 10, 11), Piece(Codec.X86, 10, 10, 9, 8)])
def test_an_x86_piece_with_a_level_or_a_length_change_is_refused(piece: Piece) -> None:
    op, payload, base, _ = filtered_op()
    [whole] = parse_delta(op, payload, 0, len(base)).pieces
    rest = Piece(Codec.X86, whole.in_length - 10, whole.out_length - piece.out_length)
    op, bad = rebuilt(op, payload, pieces=[piece, rest])
    with pytest.raises(FormatError, match="x86 output piece 0 has a level or changes the length"):
        run_op(op, bad, 0, Images(base, b""), len(base))


def test_a_wrong_x86_start_fails_the_produced_extents_hash() -> None:
    op, payload, base, target = filtered_op()
    assert run_op(op, payload, 0, Images(base, b""), len(base)) == target
    [e] = parse_delta(op, payload, 0, len(base)).extents
    op, bad = rebuilt(op, payload, extents=[replace(e, start=(e.start + 16) % x86.START_MOD)])
    with pytest.raises(HashMismatchError, match="produced extent"):
        run_op(op, bad, 0, Images(base, b""), len(base))


def test_a_codec_past_the_known_ones_is_refused_in_extents_and_pieces() -> None:
    op, payload, base, _ = filtered_op()
    record = bytearray(payload[8:72])
    record[1] = max(Codec) + 1
    _, bad = rebuilt(op, payload, extent_record=bytes(record))
    with pytest.raises(FormatError, match="dictionary extent 0 has an unknown origin, codec or reserved bytes"):
        run_op(op, bad, 0, Images(base, b""), len(base))
    delta = parse_delta(op, payload, 0, len(base))
    at = 8 + 64 * len(delta.extents)
    bad = payload[:at] + bytes([max(Codec) + 1]) + payload[at + 1 :]
    with pytest.raises(FormatError, match="output piece 0 has an unknown codec or reserved bytes"):
        run_op(op, bad, 0, Images(base, b""), len(base))
