"""Choosing the ops of one image: pure (reads the images, compresses and
writes nothing; that is `bundler.executor`).

Full image: runs of all-zero 1 MiB segments become ZERO ops, everything else
REPLACE ops of up to 4 MiB, or of the smaller chunk size a build asks for
(`plan_full(chunk=...)`: the unit an adaptive download fetches on its own).

Against a base image (`plan_delta`):
1. block dedup against the whole base: every 4 KiB block of the target is
   looked up among the base's 4 KiB-aligned blocks (preferring the block after
   the previous match, then the same offset), so a file that moved inside an
   ext4 image is still copied; runs whose source blocks are contiguous become
   SOURCE_COPY ops, zero runs ZERO ops; so does data that moved unchanged by
   a shift off that grid (squashfs blocks after a changed file: `bundler.moved`);
2. what is left (and runs too short to be worth an op of their own; the base
   regions they came from join the stretch's dictionary first) becomes DELTA
   stretches of up to `DELTA_TARGET` bytes, each with a dictionary of up to
   MAX_DICT bytes chosen by content similarity (`bundler.similarity`) from
   anywhere in the base (its streams offered inflated and as raw bytes) and
   from the target's changed runs already written, contiguous units merged
   into one extent; a stretch with no similar unit at all is a REPLACE;
3. deflate-aware (docs/delta.md): compressed streams of the target that the
   device's deflate reproduces exactly (`bundler.streams`) are carried as their
   uncompressed content and recompressed on the device (output pieces), and
   the dictionary may hold inflated streams of the base, so similarity works on
   uncompressed data; streams that do not reproduce stay raw bytes.
The executor still picks per op whichever of DELTA and REPLACE is smaller.
"""

from __future__ import annotations

import bisect
import mmap
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from bundler.format.deflate import Codec, blocks_prefix, inflate
from bundler.format.ops import MAX_DICT, MAX_DICT_EXTENTS, MAX_OP_DST, MAX_STREAM_EXTENT, OpType, Origin, Piece
from bundler.moved import Moved, copied, moved_streams, split, without
from bundler.similarity import MIN_SCORE, REGION, UnitIndex, score
from bundler.streams import Stream

SEGMENT = 1 << 20
CHUNK = MAX_OP_DST
BLOCK = 4096
DELTA_TARGET = 4 << 20  # target bytes per DELTA op
DICT_PER_BYTE = 2  # dictionary budget per byte of a stretch's content (capped at MAX_DICT)
DICT_MIN = 128 << 10
MIN_RUN = 4  # blocks: shorter copy/zero runs inside changed data join the DELTA stretch
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
    dictionary: tuple[Unit, ...] = ()  # DELTA: its dictionary, in order
    pieces: tuple[Piece, ...] = ()  # DELTA: how its decoded content becomes the extent (none: as it is)
    blocks: tuple[tuple[int, ...], ...] = ()  # DELTA: the block list of each DEFLATE_BLOCKS piece, in order


def plan_full(
    image: Buffer, size: int, chunk: int = CHUNK, held: Callable[[Buffer], bool] | None = None
) -> Iterator[Planned]:
    """ZERO for runs of zero 1 MiB segments, REPLACE chunks of up to `chunk` bytes between them.

    `chunk` (a power of two from 4 KiB to 4 MiB, `check_chunk`) is the unit an adaptive
    download fetches on its own (docs/bundle-format.md section 7.2): chunks start at
    multiples of `chunk` from the start of their run, and runs start on 1 MiB segments.
    `held(block)`, when given, says whether the devices' likely base holds a 4 KiB block
    (`ota-bundle create --adaptive-base`): REPLACE runs are also cut wherever that
    changes, so blocks the base holds and new ones never share a chunk."""
    check_chunk(chunk)
    for planned in _plan_segments(image, size):
        if planned.type is OpType.ZERO:
            yield planned
            continue
        end = planned.dst_offset + planned.dst_length
        for start, stop in _held_runs(image, planned.dst_offset, end, held):
            for at in range(start, stop, chunk):
                yield Planned(OpType.REPLACE, at, min(chunk, stop - at))


def _held_runs(
    image: Buffer, start: int, end: int, held: Callable[[Buffer], bool] | None
) -> Iterator[tuple[int, int]]:
    """[start, end) cut where `held` changes from one 4 KiB block to the next."""
    if held is None:
        yield start, end
        return
    run_start, state = start, None
    for at in range(start, end, BLOCK):
        here = held(image[at : min(at + BLOCK, end)])
        if state is not None and here != state:
            yield run_start, at
            run_start = at
        state = here
    yield run_start, end


def check_chunk(chunk: int) -> None:
    if not (BLOCK <= chunk <= CHUNK and chunk & (chunk - 1) == 0):
        raise ValueError(f"chunk size {chunk} is not a power of two from {BLOCK} to {CHUNK} bytes")


def _plan_segments(image: Buffer, size: int) -> Iterator[Planned]:
    """ZERO for runs of zero 1 MiB segments, REPLACE runs of up to 4 MiB between them."""
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


@dataclass(frozen=True, slots=True)
class Unit:
    """A piece of an image a dictionary can take: raw bytes or one inflated stream."""

    origin: Origin
    offset: int
    length: int
    codec: Codec = Codec.RAW
    produces: int = 0  # bytes it puts into a dictionary

    def content(self, image: bytes) -> bytes:
        raw = image[self.offset : self.offset + self.length]
        return raw if self.codec is Codec.RAW else inflate(raw, self.codec, self.produces, "unit")


def _units(
    origin: Origin, streams: list[Stream], spans: list[tuple[int, int]], *, raw_too: bool = False
) -> list[Unit]:
    """Streams small enough for a dictionary extent, and 64 KiB-aligned raw regions between
    them, within `spans` (sorted, disjoint; the streams lie inside them). With `raw_too`
    each stream is offered as its raw bytes too (a unit of its own, so raw regions next
    to it never clash with it): the same stream in the target may be one the device
    cannot reproduce, which stays raw bytes and matches only raw bytes."""
    if raw_too:
        plain = _units(origin, streams, spans)
        return plain + [Unit(origin, u.offset, u.length, Codec.RAW, u.length)
                        for u in plain if u.codec is not Codec.RAW]
    units: list[Unit] = []
    k = 0
    for start, end in spans:
        at = start

        def raw_until(stop: int) -> None:
            nonlocal at
            while at < stop:
                cut = min(stop, (at // REGION + 1) * REGION)
                units.append(Unit(origin, at, cut - at, Codec.RAW, cut - at))
                at = cut

        while k < len(streams) and streams[k].offset < end:
            s = streams[k]
            k += 1
            if s.offset < at or s.length > MAX_STREAM_EXTENT or s.content_length > MAX_DICT:
                continue
            raw_until(s.offset)
            units.append(Unit(origin, s.offset, s.length, s.codec, s.content_length))
            at = s.offset + s.length
        raw_until(end)
    return units


@dataclass
class _Search:
    """The similarity index over the base's and the target's units."""

    base: bytes
    target: bytes
    units: list[Unit]
    index: UnitIndex
    raw_starts: list[int]  # offsets of the base's raw units, in order (they tile the base) ...
    raw_units: list[int]  # ... and their indexes in `units`

    @classmethod
    def build(
        cls, base: bytes, target: bytes, base_streams: list[Stream],
        target_streams: list[Stream] | Future[list[Stream]], changed: list[tuple[int, int]], *,
        copied: Callable[[int, int], bool] = lambda offset, length: False,
    ) -> _Search:
        """Every unit of the base; of the target only those in `changed` runs (the rest
        equals base data, which the base's units already offer). Base units that `copied`
        names (data that moved unchanged: bundler.moved) are units but not indexed. The
        target's streams may still be verified on the pool while the base is indexed."""
        units = _units(Origin.BASE, base_streams, [(0, len(base))], raw_too=True)
        raw = sorted((u.offset, i) for i, u in enumerate(units) if u.codec is Codec.RAW)
        index = UnitIndex()

        def add(i: int) -> None:
            unit = units[i]
            image = base if unit.origin is Origin.BASE else target
            if unit.origin is Origin.BASE and copied(unit.offset, unit.length):
                return
            if unit.codec is Codec.RAW:
                index.add(i, image, unit.offset, unit.offset + unit.length)
            else:
                content = unit.content(image)
                index.add(i, content, 0, len(content))

        for i in range(len(units)):
            add(i)
        first_target = len(units)
        streams = target_streams.result() if isinstance(target_streams, Future) else target_streams
        units += _units(Origin.TARGET, streams, changed)
        for i in range(first_target, len(units)):
            add(i)
        return cls(base, target, units, index, [o for o, _ in raw], [i for _, i in raw])

    def regions(self, offsets: Iterable[int]) -> Counter[int]:
        """The base's raw units holding these offsets, with how many each holds."""
        found: Counter[int] = Counter()
        for offset in offsets:
            k = bisect.bisect_right(self.raw_starts, offset) - 1
            if k >= 0:
                found[self.raw_units[k]] += 1
        return found

    def dictionary(self, content: bytes, before: int, known: Counter[int] | None = None) -> tuple[Unit, ...]:
        """Units like `content` (target units only if they end by `before`), best last, within
        MAX_DICT; `known` units (holding blocks the stretch is known to copy) first."""
        units = self.units

        def allowed(i: int) -> bool:
            u = units[i]
            return u.origin is Origin.BASE or u.offset + u.length <= before

        hits = score(content, self.index, allowed)
        top = max(hits.values(), default=MIN_SCORE) + 1
        for i, blocks in (known or {}).items():
            hits[i] = top + blocks
        ranked = sorted((n, i) for i, n in hits.items() if n >= MIN_SCORE)
        chosen: list[tuple[int, Unit]] = []
        # A dictionary much larger than the stretch adds little and costs build time
        # (the compressor indexes all of it): at most DICT_PER_BYTE times the content.
        budget = min(MAX_DICT, DICT_PER_BYTE * len(content) + DICT_MIN)
        for n, i in reversed(ranked):
            u = units[i]
            if u.produces > budget or any(_clash(u, c) for _, c in chosen):
                continue
            chosen.append((n, u))
            budget -= u.produces
            if budget < 4096 or len(chosen) == MAX_DICT_EXTENTS:
                break
        return _merged(chosen)


def _clash(a: Unit, b: Unit) -> bool:
    """Whether two units may not both be in one dictionary: they overlap and one is a
    stream (a base stream is offered both inflated and as raw bytes; raw units that
    overlap are merged instead)."""
    return (a.origin is b.origin and a.offset < b.offset + b.length and b.offset < a.offset + a.length
            and (a.codec is not Codec.RAW or b.codec is not Codec.RAW))


def _merged(chosen: list[tuple[int, Unit]]) -> tuple[Unit, ...]:
    """The chosen units (no two clashing) as dictionary extents: raw units that touch or
    overlap in one image become one extent (each extent costs a 64-byte record in the
    payload, and extents must not overlap), and the extents are ordered by their best
    unit's score, best last (nearest the content, where zstd's offsets are cheapest)."""
    runs: list[tuple[int, Unit]] = []
    for n, u in sorted(chosen, key=lambda c: (c[1].origin, c[1].offset)):
        if runs:
            best, last = runs[-1]
            if (u.codec is Codec.RAW and last.codec is Codec.RAW and last.origin is u.origin
                    and u.offset <= last.offset + last.length):
                length = max(last.length, u.offset + u.length - last.offset)
                runs[-1] = (max(best, n), Unit(u.origin, last.offset, length, Codec.RAW, length))
                continue
        runs.append((n, u))
    runs.sort(key=lambda r: r[0])  # stable: equal scores keep image order
    return tuple(u for _, u in runs)


Segment = tuple[int, int, Stream | None]  # offset, length, the stream there (None: raw bytes)


def _segments(start: int, end: int, streams: list[Stream], starts: list[int]) -> Iterator[Segment]:
    """[start, end) as raw stretches and the verified streams wholly inside it."""
    at = start
    k = bisect.bisect_left(starts, start)
    while k < len(streams) and streams[k].offset < end:
        s = streams[k]
        k += 1
        if s.offset + s.length > end or s.offset < at:
            continue
        if s.offset > at:
            yield at, s.offset - at, None
        yield s.offset, s.length, s
        at = s.offset + s.length
    if at < end:
        yield at, end - at, None


def _stretches(
    start: int, end: int, streams: list[Stream], starts: list[int]
) -> Iterator[tuple[int, int, tuple[Segment, ...]]]:
    """A changed run cut into DELTA stretches: at most DELTA_TARGET bytes of output and of
    decoded content each, cut between streams (raw bytes anywhere)."""
    pieces: list[Segment] = []
    out = decoded = 0
    first = start
    for offset, length, stream in _segments(start, end, streams, starts):
        at, left = offset, length
        while left:
            if stream is None:
                take = min(left, DELTA_TARGET - out, DELTA_TARGET - decoded)
                size = take
            else:
                take, size = length, stream.decoded_length
                if out + take > DELTA_TARGET or decoded + size > DELTA_TARGET:
                    take = 0
            if take == 0:
                assert pieces, "every stream fits an empty stretch (MAX_CONTENT < DELTA_TARGET)"
                yield first, out, tuple(pieces)
                pieces, out, decoded, first = [], 0, 0, at
                continue
            pieces.append((at, take, stream))
            out += take
            decoded += size
            at += take
            left -= take
    if pieces:
        yield first, out, tuple(pieces)


def decoded_content(data: bytes, pieces: tuple[Piece, ...], blocks: tuple[tuple[int, ...], ...] = ()) -> bytes:
    """What a deflate-aware DELTA's frame decodes to: raw pieces as they are, streams inflated
    (a DEFLATE_BLOCKS piece's after its block list, the next of `blocks`)."""
    parts: list[bytes] = []
    lists = iter(blocks)
    at = 0
    for piece in pieces:
        raw = data[at : at + piece.out_length]
        if piece.codec is Codec.RAW:
            parts.append(raw)
        elif piece.codec is Codec.DEFLATE_BLOCKS:
            prefix = blocks_prefix(next(lists))
            parts += [prefix, inflate(raw, Codec.DEFLATE, piece.in_length - len(prefix), "piece")]
        else:
            parts.append(inflate(raw, piece.codec, piece.in_length, "piece"))
        at += piece.out_length
    return b"".join(parts)


def _delta_op(
    search: _Search, first: int, length: int, segments: tuple[Segment, ...], sources: list[int]
) -> Planned:
    pieces: list[Piece] = []
    splits: list[tuple[int, ...]] = []
    for _, n, stream in segments:
        if stream is None:
            if pieces and pieces[-1].codec is Codec.RAW:
                last = pieces[-1]
                pieces[-1] = Piece(Codec.RAW, last.in_length + n, last.out_length + n)
            else:
                pieces.append(Piece(Codec.RAW, n, n))
        elif stream.blocks:
            pieces.append(Piece(Codec.DEFLATE_BLOCKS, stream.decoded_length, n, stream.level, stream.mem_level))
            splits.append(stream.blocks)
        else:
            pieces.append(Piece(stream.codec, stream.content_length, n, stream.level, stream.mem_level))
    content = decoded_content(search.target[first : first + length], tuple(pieces), tuple(splits))
    # Blocks of the stretch that equal base blocks (runs too short for a SOURCE_COPY of
    # their own): the base regions holding them belong in the dictionary, whatever they score.
    blocks = sources[first // BLOCK : -(-(first + length) // BLOCK)]
    dictionary = search.dictionary(content, first, search.regions(src for src in blocks if src >= 0))
    if all(p.codec is Codec.RAW for p in pieces):
        pieces = []
    if not dictionary and not pieces:
        return Planned(OpType.REPLACE, first, length)
    return Planned(OpType.DELTA, first, length, dictionary=dictionary, pieces=tuple(pieces), blocks=tuple(splits))


def plan_delta(
    target: bytes, size: int, base: bytes, base_size: int, pool: ThreadPoolExecutor | None = None
) -> Iterator[Planned]:
    """The ops of `target` against `base` (both whole images in memory)."""
    sources = _block_sources(target, size, base, base_size)
    kinds: list[tuple[int, int, int]] = []  # (kind, first block, count), short runs turned _NEW
    for run, first, count in _runs(sources):
        kind = _NEW if run != _NEW and count < MIN_RUN and first + count < len(sources) else run
        if kinds and kinds[-1][0] == _NEW and kind == _NEW:
            kinds[-1] = (_NEW, kinds[-1][1], kinds[-1][2] + count)
        else:
            kinds.append((kind, first, count))
    search: _Search | None = None
    streams: list[Stream] = []
    starts: list[int] = []
    moved: list[Moved] = []
    moved_starts: list[int] = []
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
            if search is None:
                changed = [(f * BLOCK, min(size, (f + c) * BLOCK)) for k, f, c in kinds if k == _NEW]
                base_streams, verifying, moved = moved_streams(target, base, changed, pool)
                changed = without(changed, moved)
                moved_starts = [m.offset for m in moved]
                search = _Search.build(base, target, base_streams, verifying, changed, copied=copied(moved))
                streams = verifying.result()
                starts = [s.offset for s in streams]
            for at, length, src in split(start, end, moved, moved_starts):
                if src is not None:  # moved unchanged by a shift (bundler.moved)
                    for piece in range(0, length, MAX_OP_DST):
                        n = min(MAX_OP_DST, length - piece)
                        yield Planned(OpType.SOURCE_COPY, at + piece, n, src_offset=src + piece)
                    continue
                for first_byte, n, segments in _stretches(at, at + length, streams, starts):
                    yield _delta_op(search, first_byte, n, segments, sources)
