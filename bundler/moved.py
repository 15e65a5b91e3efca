"""Finding target data that moved unchanged by a shift of any number of bytes.

A squashfs image shifts everything after a changed file by however many
bytes the change added or removed, so its unchanged blocks no longer sit on
the 4 KiB grid the planner's block dedup looks at. They are found here from
the compressed streams both images hold: a target stream whose compressed
bytes equal a base stream's (a hash lookup over the two parsed stream lists)
is a seed, and each seed is extended byte-wise both ways along the same shift
(the bytes between two moved blocks usually moved with them). Runs of at
least `MIN_MOVED` bytes become SOURCE_COPY ops: no verification, no delta
and, on the device, no recompression for them.

Host-side only (the bundler); pure: reads both images, writes nothing.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from bundler.streams import Stream, find_streams, stream_starts, verifying

MIN_MOVED = 16 << 10  # shorter runs stay in the DELTA stretch (an op record costs 128 bytes)
_STEPS = (64 << 10, 4096, 256, 16, 1)  # extension compares in chunks this size, coarse first
_PREFIX = 32  # bytes of a base stream looked up where a target stream may start
_PER_PREFIX = 8  # base streams kept per prefix


@dataclass(frozen=True, slots=True)
class Moved:
    """target[offset : offset + length] == base[src_offset : src_offset + length]."""

    offset: int
    length: int
    src_offset: int


def _key(data: bytes, s: Stream) -> bytes:
    return hashlib.blake2b(memoryview(data)[s.offset : s.offset + s.length], digest_size=16).digest()


def _forward(target: bytes, base: bytes, at: int, shift: int, stop: int) -> int:
    """The first offset from `at` (below `stop`) where target and base+shift differ."""
    stop = min(stop, len(base) - shift)
    for step in _STEPS:
        while at + step <= stop and target[at : at + step] == base[at + shift : at + shift + step]:
            at += step
    return at


def _backward(target: bytes, base: bytes, at: int, shift: int, stop: int) -> int:
    """The lowest offset down from `at` (not below `stop`) from which target and base+shift agree."""
    stop = max(stop, -shift)
    for step in _STEPS:
        while at - step >= stop and target[at - step : at] == base[at - step + shift : at + shift]:
            at -= step
    return at


def _seeds(target: bytes, base: bytes, base_streams: Sequence[Stream], starts: Sequence[int]) -> list[Stream]:
    """The target's streams whose bytes equal a base stream's, found from where streams may
    start (`starts`, sorted) by the base streams' first bytes: nothing is inflated."""
    by_prefix: dict[bytes, list[Stream]] = {}
    for s in base_streams:
        same = by_prefix.setdefault(base[s.offset : s.offset + _PREFIX], [])
        if len(same) < _PER_PREFIX:  # bounds the comparisons where many streams start alike
            same.append(s)
    seeds: list[Stream] = []
    reached = -1
    for p in starts:
        if p < reached:
            continue
        for s in by_prefix.get(target[p : p + _PREFIX], ()):
            if target[p : p + s.length] == base[s.offset : s.offset + s.length]:
                seeds.append(Stream(p, s.length, s.codec, 0, 0, s.content_length, s.levels))
                reached = p + s.length
                break
    return seeds


def find_moved(
    target: bytes, base: bytes, target_streams: Sequence[Stream], base_streams: Sequence[Stream],
    spans: Sequence[tuple[int, int]], *, stops: Sequence[int] = (),
) -> list[Moved]:
    """Runs of `target` inside `spans` (sorted, disjoint) that equal base bytes at some shift,
    seeded by streams with identical compressed bytes; sorted, disjoint, each >= MIN_MOVED.
    A run ends at the first of `stops` (sorted: where a stream not in `target_streams` may
    start) past its seed, so that it cuts no such stream's header off."""
    index: dict[bytes, int] = {}
    for s in base_streams:
        index.setdefault(_key(base, s), s.offset)
    starts = [a for a, _ in spans]
    ordered = sorted(target_streams, key=lambda s: s.offset)
    offsets = [s.offset for s in ordered]

    def clipped(begin: int, end: int) -> tuple[int, int]:
        """[begin, end) shrunk so that it cuts no stream of the target: a stream that did
        not move wholly with the run stays whole for the DELTA next to it."""
        k = bisect.bisect_left(offsets, begin) - 1  # the last stream starting before begin
        if k >= 0 and ordered[k].offset + ordered[k].length > begin:
            begin = ordered[k].offset + ordered[k].length
        k = bisect.bisect_left(offsets, end) - 1  # the last stream starting before end
        if k >= 0 and ordered[k].offset + ordered[k].length > end and ordered[k].offset >= begin:
            end = ordered[k].offset
        return begin, end

    runs: list[Moved] = []
    reached = -1  # the end of the last run found
    for s in ordered:
        if s.offset < reached:
            continue
        k = bisect.bisect_right(starts, s.offset) - 1
        if k < 0 or s.offset + s.length > spans[k][1]:
            continue
        src = index.get(_key(target, s))
        if src is None:
            continue
        shift = src - s.offset
        if target[s.offset : s.offset + s.length] != base[src : src + s.length]:
            continue  # a hash collision
        span_start, span_end = spans[k]
        begin = _backward(target, base, s.offset, shift, max(span_start, reached))
        j = bisect.bisect_left(stops, s.offset + s.length)
        stop = min(span_end, stops[j]) if j < len(stops) else span_end
        end = _forward(target, base, s.offset + s.length, shift, stop)
        begin, end = clipped(begin, end)
        reached = end
        if end - begin >= MIN_MOVED:
            runs.append(Moved(begin, end - begin, begin + shift))
    return runs


def without(spans: Sequence[tuple[int, int]], runs: Sequence[Moved]) -> list[tuple[int, int]]:
    """`spans` (sorted, disjoint) minus the bytes the runs (sorted, disjoint, inside them) cover."""
    out: list[tuple[int, int]] = []
    k = 0
    for start, end in spans:
        at = start
        while k < len(runs) and runs[k].offset < end:
            run = runs[k]
            if run.offset > at:
                out.append((at, run.offset))
            at = max(at, run.offset + run.length)
            k += 1
        if at < end:
            out.append((at, end))
    return out


def split(start: int, end: int, runs: Sequence[Moved], starts: Sequence[int]) -> Iterator[tuple[int, int, int | None]]:
    """[start, end) as (offset, length, base offset of a moved run, or None for the rest);
    `starts` are the runs' offsets."""
    at = start
    k = bisect.bisect_left(starts, start)
    while k < len(runs) and runs[k].offset < end:
        run = runs[k]
        k += 1
        if run.offset > at:
            yield at, run.offset - at, None
        stop = min(end, run.offset + run.length)
        yield run.offset, stop - run.offset, run.src_offset
        at = stop
    if at < end:
        yield at, end - at, None


def moved_streams(
    target: bytes, base: bytes, changed: Sequence[tuple[int, int]], pool: ThreadPoolExecutor | None = None
) -> tuple[list[Stream], Future[list[Stream]], list[Moved]]:
    """The base's streams (unverified: a dictionary only inflates them), the verified streams
    of the target's `changed` spans outside moved runs (still being verified on the pool
    when this returns), and those moved runs. Only streams
    that did not move unchanged are verified (deflated again): on the squashfs corpus pair
    that is 500 of 1,700."""
    starts = stream_starts(target, changed)
    base_streams = find_streams(base, pool, verify=False)  # scanned in parts on the pool
    seeds = _seeds(target, base, base_streams, starts)
    seed_starts = [s.offset for s in seeds]

    def in_seed(p: int) -> bool:  # a seed's bytes are a whole base stream: no other starts there
        k = bisect.bisect_right(seed_starts, p) - 1
        return k >= 0 and p < seeds[k].offset + seeds[k].length

    moved = find_moved(target, base, seeds, base_streams, changed, stops=[p for p in starts if not in_seed(p)])
    # Only these are inflated; a stream the base holds byte for byte (moved, but in a run too
    # short to copy) stays raw bytes: they match the base's raw bytes, at a quarter of the
    # dictionary its content would cost, and the device deflates nothing.
    held = {hash(base[s.offset : s.offset + s.length]) for s in base_streams}
    rest = find_streams(target, pool, verify=False, within=without(changed, moved), skip=held)
    return base_streams, verifying(target, rest, pool), moved


def copied(runs: Sequence[Moved]) -> Callable[[int, int], bool]:
    """Whether base[offset : offset + length] lies wholly inside the source of one run: data
    the target holds unchanged elsewhere, so the target's changed data likely came from
    other base data; the similarity search need not index it."""
    spans = sorted((r.src_offset, r.src_offset + r.length) for r in runs)
    starts = [a for a, _ in spans]

    def inside(offset: int, length: int) -> bool:
        k = bisect.bisect_right(starts, offset) - 1
        return k >= 0 and offset + length <= spans[k][1]

    return inside
