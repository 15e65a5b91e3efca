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
uncompressed content of its streams, at STREAM_LEVEL when that is most of a
large op (docs/delta.md "Build time"). The extent is also compressed as a
REPLACE, and the smaller one is kept, unless the delta is at most half of
the extent's level-1 frame (then the REPLACE cannot win and is not made).
SOURCE_COPY and ZERO need no payload.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import zstandard

from bundler.format import x86
from bundler.format.deflate import Codec, inflate
from bundler.format.ops import MAX_DELTA_WINDOW, DictExtent, Op, OpType, Origin, Piece, pack_delta
from bundler.planner import Buffer, Planned, decoded_content
from bundler.similarity import features

DELTA_LEVEL = 19
# Ops made of inflated stream content (squashfs blocks: at least STREAM_SHARE of it) whose
# content and dictionary exceed STREAM_MIN bytes: zstd's lazy2 level instead of btultra2,
# 7x faster for 8% more bytes on the squashfs corpus (docs/delta.md "Build time").
STREAM_LEVEL = 12
STREAM_SHARE = 0.9
STREAM_MIN = 1 << 20
# Off by default: on the ext4 pair it saved 73 KB (2.9%) for 15% more build CPU (47.6 against
# 40.3 s), and build time, not size, is the target with the smaller margin (docs/delta.md).
X86_FILTER = False
X86_DENSITY = 0.002  # rewritable branches per byte from which an extent is tried x86-filtered
X86_MIN_PAYLOAD = 1024  # a smaller delta is not worth a second compression
X86_PROBE_LEVEL = 9  # the fast level that decides whether the filtered variant is compressed at DELTA_LEVEL
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


def _delta_frame(data: bytes, dictionary: bytes, level: int = DELTA_LEVEL) -> bytes:
    window_log = max(10, (len(dictionary) + len(data) - 1).bit_length())
    assert 1 << window_log <= MAX_DELTA_WINDOW
    params = zstandard.ZstdCompressionParameters.from_level(
        level,  # DELTA_LEVEL 19 is btultra2, STREAM_LEVEL 12 lazy2
        # (sizing the tables for dictionary plus content made the largest ext4 ops 0.5%
        # smaller for ~8% more CPU: not worth the build time)
        source_size=len(data),
        window_log=window_log,
        write_content_size=True,
        write_checksum=False,
    )
    if not dictionary:
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    raw = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=raw).compress(data)


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
    """The DELTA op and its payload: extent list, pieces, and the frame against the
    dictionary. With `X86_FILTER`, for x86 code (`X86_DENSITY`) the x86-filtered variant is compressed too
    where a fast level (`X86_PROBE_LEVEL`, ~7% of the work) says it is smaller, and the
    smaller of the two kept (the probe picked the winner on every ext4 op it was tried on)."""
    plain = _delta_inputs(planned, inputs, data, filtered=False)
    payload = pack_delta(plain[0], plain[1], _delta_frame(plain[3], plain[2], _level(plain)))
    if X86_FILTER and not planned.pieces and x86.density(data) >= X86_DENSITY and len(payload) >= X86_MIN_PAYLOAD:
        filtered = _delta_inputs(planned, inputs, data, filtered=True)
        probe = _delta_frame(filtered[3], filtered[2], X86_PROBE_LEVEL)
        if len(probe) < len(_delta_frame(plain[3], plain[2], X86_PROBE_LEVEL)):
            other = pack_delta(filtered[0], filtered[1], _delta_frame(filtered[3], filtered[2]))
            if len(other) < len(payload):
                plain, payload = filtered, other
    digest = hashlib.sha256(payload).digest()
    op = Op(OpType.DELTA, planned.dst_offset, planned.dst_length, 0, len(payload), digest, dst_hash, 0,
            len(plain[2]))
    return op, payload


DeltaInputs = tuple[list[DictExtent], tuple[Piece, ...], bytes, bytes]  # extents, pieces, dictionary, content


def _level(made: DeltaInputs) -> int:
    """STREAM_LEVEL for a large op made mostly of inflated stream content, else DELTA_LEVEL."""
    _, pieces, dictionary, content = made
    inflated = sum(p.in_length for p in pieces if p.codec is not Codec.RAW)
    streamy = inflated >= STREAM_SHARE * len(content) and len(content) + len(dictionary) > STREAM_MIN
    return STREAM_LEVEL if streamy else DELTA_LEVEL


def _delta_inputs(planned: Planned, inputs: Inputs, data: bytes, *, filtered: bool) -> DeltaInputs:
    """What one DELTA payload is made of. `filtered`: raw dictionary extents become X86
    extents whose start lines them up with the target (`_displacement`), and the extent is
    one X86 piece whose start is its own offset, so moved code matches moved code
    (bundler.format.x86)."""
    assert inputs.base is not None
    images = {Origin.BASE: inputs.base, Origin.TARGET: inputs.target}
    extents: list[DictExtent] = []
    parts: list[bytes] = []
    near = _features(data, planned.dst_offset) if filtered else {}
    for unit in planned.dictionary:
        image = images[unit.origin]
        raw = bytes(image[unit.offset : unit.offset + unit.length])
        digest = hashlib.sha256(raw).digest()
        if filtered and unit.codec is Codec.RAW:
            start = (unit.offset + _displacement(near, raw, unit.offset)) % x86.START_MOD
            parts.append(bytes(x86.encode(raw, start)))
            extents.append(DictExtent(unit.origin, unit.offset, unit.length, digest, Codec.X86, unit.length, start))
            continue
        parts.append(raw if unit.codec is Codec.RAW else inflate(raw, unit.codec, unit.produces, "unit"))
        extents.append(DictExtent(unit.origin, unit.offset, unit.length, digest, unit.codec, unit.produces))
    pieces = planned.pieces
    if filtered:
        content = bytes(x86.encode(data, planned.dst_offset))
        if x86.decode(content, planned.dst_offset) != data:
            raise AssertionError(f"x86 filter does not invert at {planned.dst_offset}")
        pieces = (Piece(Codec.X86, len(data), len(data)),)
    else:
        content = data if not pieces else decoded_content(data, pieces, planned.blocks)
    return extents, pieces, b"".join(parts), content


def _features(data: bytes, offset: int) -> dict[int, int]:
    """Content feature -> its position in the image (features found twice are dropped)."""
    found: dict[int, int] = {}
    for p, h in features(data, 0, len(data)):
        found[h] = -1 if h in found else offset + p
    return found


def _displacement(near: dict[int, int], raw: bytes, offset: int) -> int:
    """How far the target holds this extent's content from where the extent is: the most
    common difference between the positions of features both hold (0 if none)."""
    shifts: Counter[int] = Counter()
    seen: set[int] = set()
    for p, h in features(raw, 0, len(raw)):
        at = near.get(h, -1)
        if at >= 0 and h not in seen:
            seen.add(h)
            shifts[at - (offset + p)] += 1
    return shifts.most_common(1)[0][0] if shifts else 0


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
