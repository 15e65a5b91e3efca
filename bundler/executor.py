"""Turning planned ops (`bundler.planner`) into op records and payload pieces:
compresses on a pool of threads, writes the pieces to the payload spool in
table order, and keeps at most `in_flight` ops queued beyond those being
compressed, so memory stays bounded.

REPLACE: one zstd frame at the bundle's level, its content size declared.
DELTA: the frame is compressed against the concatenation of its dictionary
extents (inflated where they are streams) as raw content (zstd's
patch-from), with parameters chosen for it (btultra2, a window covering
dictionary and extent; long-distance matching found nothing more on real
images and cost ~10% more time); a deflate-aware DELTA compresses the
uncompressed content of its streams. The extent is also compressed as a
REPLACE, and the smaller one is kept, unless the delta is at most half of
the extent's level-1 frame (then the REPLACE cannot win and is not made).
SOURCE_COPY and ZERO need no payload.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import zstandard

from bundler.format.deflate import Codec, inflate
from bundler.format.ops import MAX_DELTA_WINDOW, DictExtent, Op, OpType, Origin, Piece, pack_delta
from bundler.planner import Buffer, Planned

DELTA_LEVEL = 19
_local = threading.local()


class Spool(Protocol):
    def write(self, data: bytes) -> int: ...


@dataclass(frozen=True, slots=True)
class Inputs:
    """The bytes one image's ops are made from (whole images, in memory or mapped)."""

    target: Buffer
    base: Buffer | None = None


def _replace_compressor(level: int) -> zstandard.ZstdCompressor:
    key = ("r", level)
    c = getattr(_local, "cache", {}).get(key)
    if c is None:
        c = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _local.cache = {**getattr(_local, "cache", {}), key: c}
    return c


def _delta_frame(data: bytes, dictionary: bytes) -> bytes:
    window_log = max(10, (len(dictionary) + len(data) - 1).bit_length())
    assert 1 << window_log <= MAX_DELTA_WINDOW
    params = zstandard.ZstdCompressionParameters.from_level(
        DELTA_LEVEL,
        source_size=len(data),
        window_log=window_log,
        strategy=zstandard.STRATEGY_BTULTRA2,
        write_content_size=True,
        write_checksum=False,
    )
    if not dictionary:
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    raw = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=raw).compress(data)


def _content(data: bytes, pieces: tuple[Piece, ...]) -> bytes:
    """What a deflate-aware DELTA's frame decodes to: raw pieces as they are, streams inflated."""
    parts: list[bytes] = []
    at = 0
    for piece in pieces:
        raw = data[at : at + piece.out_length]
        parts.append(raw if piece.codec is Codec.RAW else inflate(raw, piece.codec, piece.in_length, "piece"))
        at += piece.out_length
    return b"".join(parts)


def make_op(planned: Planned, inputs: Inputs, level: int) -> tuple[Op, bytes]:
    """The op record (payload offset 0, fixed by the caller) and its payload piece."""
    start, length = planned.dst_offset, planned.dst_length
    if planned.type is OpType.ZERO:
        return Op(OpType.ZERO, start, length), b""
    data = bytes(inputs.target[start : start + length])
    dst_hash = hashlib.sha256(data).digest()
    if planned.type is OpType.SOURCE_COPY:
        assert inputs.base is not None
        src = planned.src_offset
        if inputs.base[src : src + length] != data:
            raise AssertionError(f"planner chose a SOURCE_COPY at {src} that does not hold the target at {start}")
        return Op(OpType.SOURCE_COPY, start, length, dst_sha256=dst_hash, src_offset=src, src_length=length), b""
    if planned.type is OpType.DELTA:
        delta = _make_delta(planned, inputs, data, dst_hash)
        # The REPLACE alternative is compressed only where it might win: a delta less than
        # half of what the fastest level makes of the extent stays a delta unseen.
        if len(delta[1]) * 2 <= len(_replace_compressor(1).compress(data)):
            return delta
        frame = _replace_compressor(level).compress(data)
        if len(delta[1]) < len(frame):
            return delta
    else:
        frame = _replace_compressor(level).compress(data)
    return Op(OpType.REPLACE, start, length, 0, len(frame), hashlib.sha256(frame).digest(), dst_hash), frame


def _make_delta(planned: Planned, inputs: Inputs, data: bytes, dst_hash: bytes) -> tuple[Op, bytes]:
    """The DELTA op and its payload: extent list, pieces, and the frame against the dictionary."""
    assert inputs.base is not None
    images = {Origin.BASE: inputs.base, Origin.TARGET: inputs.target}
    extents: list[DictExtent] = []
    parts: list[bytes] = []
    for unit in planned.dictionary:
        image = images[unit.origin]
        raw = bytes(image[unit.offset : unit.offset + unit.length])
        parts.append(raw if unit.codec is Codec.RAW else inflate(raw, unit.codec, unit.produces, "unit"))
        digest = hashlib.sha256(raw).digest()
        extents.append(DictExtent(unit.origin, unit.offset, unit.length, digest, unit.codec, unit.produces))
    dictionary = b"".join(parts)
    content = data if not planned.pieces else _content(data, planned.pieces)
    payload = pack_delta(extents, planned.pieces, _delta_frame(content, dictionary))
    digest = hashlib.sha256(payload).digest()
    op = Op(OpType.DELTA, planned.dst_offset, planned.dst_length, 0, len(payload), digest, dst_hash, 0,
            len(dictionary))
    return op, payload


def execute(
    planned: Iterable[Planned],
    inputs: Inputs,
    spool: Spool,
    pool: ThreadPoolExecutor,
    *,
    level: int,
    in_flight: int,
    tick: Callable[[int], None] = lambda n: None,
) -> list[Op]:
    """Run the plan; the ops come back in table order with their payload offsets in the spool."""
    ops: list[Op] = []
    pending: deque[Future[tuple[Op, bytes]]] = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            op, payload = pending.popleft().result()
            if payload:
                at = spool.write(payload)
                op = Op(op.type, op.dst_offset, op.dst_length, at, len(payload), op.payload_sha256,
                        op.dst_sha256, op.src_offset, op.src_length)
            last = ops[-1] if ops else None
            if (op.type is OpType.ZERO and last is not None and last.type is OpType.ZERO
                    and last.dst_offset + last.dst_length == op.dst_offset):
                op = Op(OpType.ZERO, last.dst_offset, last.dst_length + op.dst_length)
                ops[-1] = op
            else:
                ops.append(op)
            tick(op.dst_length if op is not last else 0)

    try:
        for item in planned:
            pending.append(pool.submit(make_op, item, inputs, level))
            drain(in_flight)
        drain(0)
    except BaseException:
        for fut in pending:
            fut.cancel()  # an interrupt or error does not wait for queued compressions
        raise
    return ops
