"""Choosing the ops of one image: pure (reads the images, compresses and
writes nothing; that is `bundler.executor`).

Full image: runs of all-zero 1 MiB segments become ZERO ops, everything else
REPLACE ops of up to 4 MiB.

Against a base image (`plan_delta`):
1. block dedup against the whole base: every 4 KiB block of the target is
   looked up among the base's 4 KiB-aligned blocks (preferring the block after
   the previous match, then the same offset), so a file that moved inside an
   ext4 image is still copied; runs whose source blocks are contiguous become
   SOURCE_COPY ops, zero runs ZERO ops;
2. what is left (and runs too short to be worth an op of their own) becomes
   DELTA stretches of up to `DELTA_TARGET` bytes, each with a dictionary of up
   to MAX_DICT bytes chosen by content similarity (`bundler.similarity`) from
   anywhere in the base and from the target already written; a stretch with no
   similar region at all is a REPLACE.
The executor still picks per op whichever of DELTA and REPLACE is smaller.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

from bundler.format.ops import MAX_DICT, MAX_DICT_EXTENTS, MAX_OP_DST, OpType, Origin
from bundler.similarity import MIN_SCORE, REGION, REGION_SHIFT, RegionIndex, score

SEGMENT = 1 << 20
CHUNK = MAX_OP_DST
BLOCK = 4096
DELTA_TARGET = 4 << 20  # target bytes per DELTA op
MIN_RUN = 8  # blocks: shorter copy/zero runs inside changed data join the DELTA stretch
_ZERO_SEGMENT = bytes(SEGMENT)
_ZERO_BLOCK = bytes(BLOCK)

Buffer = bytes | mmap.mmap


@dataclass(frozen=True, slots=True)
class Planned:
    """One op as chosen: what the executor makes into an `Op` (and a payload)."""

    type: OpType
    dst_offset: int
    dst_length: int
    src_offset: int = 0  # SOURCE_COPY: where in the base
    dictionary: tuple[tuple[Origin, int, int], ...] = ()  # DELTA: (origin, offset, length), in order


def plan_full(image: Buffer, size: int) -> Iterator[Planned]:
    """ZERO for runs of zero 1 MiB segments, REPLACE chunks of up to 4 MiB between them."""
    zero_start: int | None = None
    chunk_start: int | None = None
    for offset in range(0, size, SEGMENT):
        length = min(SEGMENT, size - offset)
        if image[offset : offset + length] == _ZERO_SEGMENT[:length]:
            if chunk_start is not None:
                yield Planned(OpType.REPLACE, chunk_start, offset - chunk_start)
                chunk_start = None
            if zero_start is None:
                zero_start = offset
            continue
        if zero_start is not None:
            yield Planned(OpType.ZERO, zero_start, offset - zero_start)
            zero_start = None
        if chunk_start is None:
            chunk_start = offset
        if offset + length - chunk_start >= CHUNK:
            yield Planned(OpType.REPLACE, chunk_start, offset + length - chunk_start)
            chunk_start = None
    if zero_start is not None:
        yield Planned(OpType.ZERO, zero_start, size - zero_start)
    if chunk_start is not None:
        yield Planned(OpType.REPLACE, chunk_start, size - chunk_start)


_ZERO = -1
_NEW = -2


def _block_sources(target: Buffer, size: int, base: Buffer, base_size: int) -> list[int]:
    """Per target block: _ZERO, _NEW, or the base offset holding the same bytes."""
    index: dict[int, int] = {}  # hash of a block -> its first offset (bytes compared on use)
    for offset in range(0, base_size - BLOCK + 1, BLOCK):
        block = base[offset : offset + BLOCK]
        if block != _ZERO_BLOCK:
            index.setdefault(hash(block), offset)
    sources: list[int] = []
    previous = _NEW
    for offset in range(0, size, BLOCK):
        block = target[offset : offset + BLOCK]
        if block == _ZERO_BLOCK[: len(block)]:
            sources.append(_ZERO)
            previous = _NEW
            continue
        src = _NEW
        if len(block) == BLOCK:
            follow = previous + BLOCK
            if previous >= 0 and follow + BLOCK <= base_size and base[follow : follow + BLOCK] == block:
                src = follow
            elif offset + BLOCK <= base_size and base[offset : offset + BLOCK] == block:
                src = offset
            else:
                found = index.get(hash(block), _NEW)
                if found >= 0 and base[found : found + BLOCK] == block:
                    src = found
        sources.append(src)
        previous = src
    return sources


def _runs(sources: list[int]) -> Iterator[tuple[int, int, int]]:
    """(kind, first block, block count): kind is _ZERO, _NEW or the base offset of the
    first block of a run whose sources are contiguous."""
    i = 0
    n = len(sources)
    while i < n:
        kind = sources[i]
        j = i + 1
        if kind >= 0:
            while j < n and sources[j] == kind + (j - i) * BLOCK:
                j += 1
        else:
            while j < n and sources[j] == kind:
                j += 1
        yield kind, i, j - i
        i = j


def _extents(
    target: bytes, span: tuple[int, int], base_index: RegionIndex, target_index: RegionIndex | None, base_size: int
) -> tuple[tuple[Origin, int, int], ...]:
    """The dictionary of a DELTA stretch: similar regions, best last, within MAX_DICT."""
    start, end = span
    in_base, in_target = score(target, start, end, base_index, target_index)
    ranked = [(n, Origin.BASE, r) for r, n in in_base.items() if n >= MIN_SCORE]
    ranked += [(n, Origin.TARGET, r) for r, n in in_target.items() if n >= MIN_SCORE]
    ranked.sort(key=lambda x: (-x[0], x[1], x[2]))
    chosen: list[tuple[int, Origin, int]] = []
    budget = MAX_DICT
    for n, origin, region in ranked:
        limit = base_size if origin is Origin.BASE else start
        length = min(REGION, limit - (region << REGION_SHIFT))
        if length <= 0 or length > budget:
            continue
        chosen.append((n, origin, region))
        budget -= length
        if budget < REGION:
            break
    # Merge neighbouring regions into extents; keep at most MAX_DICT_EXTENTS (the best).
    spans: dict[tuple[Origin, int], tuple[int, int]] = {}  # (origin, first region) -> (last region, best score)
    for n, origin, region in sorted(chosen, key=lambda x: (x[1], x[2])):
        merged = False
        for (o, first), (last, best) in list(spans.items()):
            if o is origin and last + 1 == region:
                spans[(o, first)] = (region, max(best, n))
                merged = True
                break
        if not merged:
            spans[(origin, region)] = (region, n)
    ordered = sorted(spans.items(), key=lambda kv: kv[1][1])[-MAX_DICT_EXTENTS:]  # best last
    out: list[tuple[Origin, int, int]] = []
    for (origin, first), (last, _) in ordered:
        limit = base_size if origin is Origin.BASE else start
        offset = first << REGION_SHIFT
        out.append((origin, offset, min((last + 1) << REGION_SHIFT, limit) - offset))
    return tuple(out)


def plan_delta(target: Buffer, size: int, base: Buffer, base_size: int) -> Iterator[Planned]:
    """The ops of `target` against `base` (both whole images in memory or mapped)."""
    sources = _block_sources(target, size, base, base_size)
    kinds: list[tuple[int, int, int]] = []  # (kind, first block, count), short runs turned _NEW
    for run, first, count in _runs(sources):
        kind = _NEW if run != _NEW and count < MIN_RUN and first + count < len(sources) else run
        if kinds and kinds[-1][0] == _NEW and kind == _NEW:
            kinds[-1] = (_NEW, kinds[-1][1], kinds[-1][2] + count)
        else:
            kinds.append((kind, first, count))
    base_bytes = base if isinstance(base, bytes) else bytes(base[:base_size])
    target_bytes = target if isinstance(target, bytes) else bytes(target[:size])
    base_index: RegionIndex | None = None
    target_index: RegionIndex | None = None
    for kind, first, count in kinds:
        start = first * BLOCK
        end = min(size, (first + count) * BLOCK)
        if kind == _ZERO:
            yield Planned(OpType.ZERO, start, end - start)
        elif kind >= 0:
            for at in range(start, end, MAX_OP_DST):
                length = min(MAX_OP_DST, end - at)
                yield Planned(OpType.SOURCE_COPY, at, length, src_offset=kind + (at - start))
        else:
            if base_index is None:
                base_index = RegionIndex.build(base_bytes)
                target_index = RegionIndex.build(target_bytes)
            for at in range(start, end, DELTA_TARGET):
                stop = min(end, at + DELTA_TARGET)
                extents = _extents(target_bytes, (at, stop), base_index, target_index, base_size)
                if extents:
                    yield Planned(OpType.DELTA, at, stop - at, dictionary=extents)
                else:
                    yield Planned(OpType.REPLACE, at, stop - at)
