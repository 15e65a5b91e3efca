"""What makes a delta apply fast must not change what it produces:

- a deflate-aware DELTA piece whose content a base stream already holds
  compressed takes that stream's bytes instead of deflating again; a wrong guess
  (same content and length, other bytes) is caught by the extent's hash and the
  op recompresses, producing the right extent;
- the op runner (agent.oprunner) never holds more than its budget of op memory,
  starts an op that reads the target only after every earlier op is written,
  and reports the failure of the lowest op index after the ops in flight end.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import zlib
from collections.abc import Iterator, Sequence

import pytest
import zstandard

import bundler.format.apply as apply
from agent.oprunner import OpRunner
from bundler.format.apply import op_memory, run_op
from bundler.format.deflate import Codec, deflate
from bundler.format.errors import FormatError
from bundler.format.ops import MAX_OP_DST, DictExtent, Op, OpType, Origin, Piece, pack_delta


def zlib_stream(content: bytes, level: int, mem_level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 15, mem_level, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(content) + c.flush(zlib.Z_FINISH)


def text() -> bytes:
    """Content whose level-9 and level-8 zlib streams have one length and differ (found by search)."""
    words = [bytes(random.Random(1).choice(b"abcdefgh") for _ in range(5)) for _ in range(50)]
    rng = random.Random(12)
    return b" ".join(rng.choice(words) + rng.randbytes(rng.randint(0, 3)).hex().encode() for _ in range(3000))


class Base:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0

    def readinto(self, origin: Origin, offset: int, buf: memoryview, /) -> None:
        assert origin is Origin.BASE
        self.reads += 1
        buf[:] = self.data[offset : offset + len(buf)]


def deflate_aware(base_stream: bytes, content: bytes, level: int) -> tuple[Op, bytes, Base, bytes]:
    """A DELTA whose one dictionary extent is `base_stream` (in a base image) and whose
    one ZLIB piece is `content` deflated at `level`: (op, payload, base, expected extent)."""
    base = Base(bytes(4096) + base_stream + bytes(4096))
    extent = zlib_stream(content, level, 8)
    dictionary = DictExtent(Origin.BASE, 4096, len(base_stream), hashlib.sha256(base_stream).digest(),
                            Codec.ZLIB, len(content))
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(content)
    payload = pack_delta([dictionary], [Piece(Codec.ZLIB, len(content), len(extent), level, 8)], frame)
    op = Op(OpType.DELTA, 0, len(extent), 0, len(payload), hashlib.sha256(payload).digest(),
            hashlib.sha256(extent).digest(), 0, len(content))
    return op, payload, base, extent


def count_deflates(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = deflate

    def counting(data: bytes | bytearray | memoryview, codec: Codec, level: int, mem_level: int) -> bytes:
        calls.append(level)
        return real(data, codec, level, mem_level)

    monkeypatch.setattr(apply, "deflate", counting)
    return calls


def test_a_piece_the_base_holds_compressed_is_taken_from_the_base_without_deflating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    content = text()
    op, payload, base, extent = deflate_aware(zlib_stream(content, 9, 8), content, 9)
    deflates = count_deflates(monkeypatch)

    assert run_op(op, payload, 0, base, len(base.data)) == extent

    assert deflates == []
    assert base.reads == 2, "the stream was read (and hash-checked) again for its bytes"


def test_a_wrong_guess_is_caught_by_the_extent_hash_and_the_op_recompresses(monkeypatch: pytest.MonkeyPatch) -> None:
    content = text()
    base_stream = zlib_stream(content, 9, 8)
    op, payload, base, extent = deflate_aware(base_stream, content, 8)
    assert len(extent) == len(base_stream)
    assert extent != base_stream
    deflates = count_deflates(monkeypatch)

    assert run_op(op, payload, 0, base, len(base.data)) == extent

    assert deflates == [8]


def test_a_guess_whose_header_names_another_level_is_not_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    content = text()
    op, payload, base, extent = deflate_aware(zlib_stream(content, 9, 8), content, 1)
    deflates = count_deflates(monkeypatch)

    assert run_op(op, payload, 0, base, len(base.data)) == extent

    assert deflates == [1]
    assert base.reads == 1


# ---- the op runner ------------------------------------------------------------


def ops_of(kinds: str, size: int = 1 << 20) -> list[Op]:
    """S: SOURCE_COPY, R: REPLACE, Z: ZERO; `size` bytes each, back to back."""
    types = {"S": OpType.SOURCE_COPY, "R": OpType.REPLACE, "Z": OpType.ZERO}
    out = []
    for k, kind in enumerate(kinds):
        payload = size if kind == "R" else 0
        out.append(Op(types[kind], k * size, size, payload_length=payload, src_length=size if kind == "S" else 0))
    return out


def stream(ops: list[Op], log: list[str] | None = None) -> Iterator[tuple[int, Op, int]]:
    for index, op in enumerate(ops):
        if log is not None:
            log.append(f"read {index}")
        yield index, op, index


def test_the_runner_keeps_op_memory_in_flight_within_its_budget() -> None:
    ops = ops_of("SRSRSSRRSS")
    budget = 3 * (1 << 20) + (1 << 19)  # room for a SOURCE_COPY and a REPLACE, not more
    lock = threading.Lock()
    flight = [0, 0]  # now, most
    written: list[int] = []
    second_started = threading.Event()

    def produce(index: int, op: Op, payload: int) -> bytes:
        with lock:
            flight[0] += op_memory(op)
            flight[1] = max(flight[1], flight[0])
        if index == 1:
            second_started.set()
        if index == 0:
            assert second_started.wait(10), "op 1 was not admitted next to op 0"
        time.sleep(0.005)
        with lock:
            flight[0] -= op_memory(op)
        return b"x"

    runner: OpRunner[int] = OpRunner(produce=produce, write=lambda i, op, d: written.append(i),
                                     done=lambda i, op: None, reads_target=lambda i, op, p: [],
                                     workers=4, budget=budget)
    runner.run(stream(ops), ops)

    assert sorted(written) == list(range(len(ops)))
    assert max(op_memory(op) for op in ops) < flight[1] <= budget


def _reader_sees(reads: Sequence[tuple[int, int]] | None) -> tuple[list[int], list[int]]:
    """Ops 0-3 end late, in reverse order; op 4 reads the target `reads` (None: cannot
    tell). What had been written when op 4 was produced, and what was written in all."""
    ops = ops_of("SSSSRS", size=4096)
    written: list[int] = []
    lock = threading.Lock()
    seen_by_reader: list[int] = []

    def produce(index: int, op: Op, payload: int) -> bytes:
        if index == 4:
            with lock:
                seen_by_reader.extend(sorted(written))
        elif index < 4:
            time.sleep(0.05 * (4 - index))
        return b"x"

    def write(index: int, op: Op, data: object) -> None:
        with lock:
            written.append(index)

    runner: OpRunner[int] = OpRunner(produce=produce, write=write, done=lambda i, op: None,
                                     reads_target=lambda i, op, p: reads if i == 4 else [], workers=4)
    runner.run(stream(ops), ops)
    return seen_by_reader, sorted(written)


def test_an_op_whose_target_reads_cannot_be_told_starts_after_every_earlier_op_is_written() -> None:
    seen, written = _reader_sees(None)
    assert seen == [0, 1, 2, 3]
    assert written == list(range(6))


def test_an_op_that_reads_the_target_waits_only_for_the_earlier_ops_writing_what_it_reads() -> None:
    # Op 1 writes [4096, 8192) and op 3 [12288, 16384); the reader needs a byte of
    # each. Op 0 (the slowest, 0.2 s) and op 2 write elsewhere and may still run.
    seen, written = _reader_sees([(8191, 1), (12288, 100)])
    assert {1, 3} <= set(seen)
    assert 0 not in seen
    assert written == list(range(6))


def test_hints_name_the_target_ranges_a_delta_reads_and_cannot_tell_from_a_short_payload() -> None:
    digest = bytes(32)
    extents = [DictExtent(Origin.BASE, 0, 4096, digest), DictExtent(Origin.TARGET, 8192, 100, digest),
               DictExtent(Origin.BASE, 65536, 512, digest), DictExtent(Origin.TARGET, 0, 4096, digest)]
    payload = pack_delta(extents, [], b"frame")
    op = Op(OpType.DELTA, 1 << 20, 4096, 0, len(payload), digest, digest, 0, 4096 + 100 + 512 + 4096)
    assert apply.hints(op, payload) == ([(Origin.BASE, 0, 4096), (Origin.BASE, 65536, 512)], [(8192, 100), (0, 4096)])
    assert apply.hints(op, payload[:20]) == ([], None)  # the extent list is cut: taken to read anything
    assert apply.hints(op, b"") == ([], None)
    copy = Op(OpType.SOURCE_COPY, 0, 4096, src_offset=8192, src_length=4096)
    assert apply.hints(copy, None) == ([(Origin.BASE, 8192, 4096)], [])


def test_the_failure_of_the_lowest_op_is_raised_after_the_ops_in_flight_end() -> None:
    ops = ops_of("SSSSSSSS", size=4096)
    later_failed = threading.Event()
    ended: list[int] = []

    def produce(index: int, op: Op, payload: int) -> bytes:
        try:
            if index == 3:
                later_failed.set()
                raise FormatError("op 3: broken")
            if index == 1:
                assert later_failed.wait(10)
                raise FormatError("op 1: broken")
            return b"x"
        finally:
            ended.append(index)

    done: list[int] = []
    runner: OpRunner[int] = OpRunner(produce=produce, write=lambda i, op, d: None, done=lambda i, op: done.append(i),
                                     reads_target=lambda i, op, p: [], workers=4)
    with pytest.raises(FormatError, match="op 1: broken"):
        runner.run(stream(ops), ops)
    assert 1 in ended
    assert 3 in ended
    assert 1 not in done
    assert 3 not in done


def test_a_delta_bound_from_its_records_is_below_the_bound_without_them() -> None:
    content = text()
    op, payload, _, _ = deflate_aware(zlib_stream(content, 9, 8), content, 9)
    assert op_memory(op, payload) < op_memory(op) <= op.payload_length + 3 * MAX_OP_DST + 2 * op.src_length
