"""Finding the compressed streams of an image that the device can reproduce.

Scans an image for zlib streams (RFC 1950 headers, as squashfs writes its
blocks) and gzip members (their raw deflate body, as .gz files inside an ext4
image hold), inflates each candidate, and keeps a stream only if
`bundler.format.deflate.deflate` (the exact deflate the device runs) with
some level and memLevel reproduces its bytes exactly, or, for a gzip member,
`deflate_blocks` with the member's own block boundaries (GNU gzip's output;
bundler.deflateblocks reads them). Everything else stays raw bytes.
Host-side only; the verification runs on a pool of threads (zlib releases
the GIL).
"""

from __future__ import annotations

import bisect
import re
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from bundler.deflateblocks import block_ends
from bundler.format.deflate import Codec, blocks_prefix, deflate, deflate_blocks

MAX_CONTENT = 2 << 20  # larger streams stay raw (an op decodes at most 4 MiB)
MAX_PACKED = 1 << 20  # bundler.format.ops.MAX_STREAM_EXTENT: what a dictionary extent may inflate
MIN_PACKED = 64  # smaller streams are not worth a piece record
_ZLIB = re.compile(b"\x78[\x01\x5e\x9c\xda]")
_GZIP = re.compile(b"\x1f\x8b\x08")
_ZLIB_LEVELS = {0: (1,), 1: (2, 3, 4, 5), 2: (6,), 3: (9, 8, 7)}  # by the header's FLEVEL hint
_MEM_LEVELS = (8, 9)
_MAX_BLOCKS = 4096  # a longer block list is not worth its bytes
_STEP = 64 << 10  # content bytes fed per step when a (level, memLevel) is tried in steps
_MIN_PART = 4 << 20  # a smaller scan is not split across the pool
_MAX_PARTS = 8  # parts of one scan queued on the pool (more than its workers keeps them all busy)


@dataclass(frozen=True, slots=True)
class Stream:
    offset: int
    length: int  # compressed bytes in the image
    codec: Codec
    level: int
    mem_level: int
    content_length: int
    levels: tuple[int, ...] = ()  # unverified (level 0): the levels `verifying` tries, likeliest first
    blocks: tuple[int, ...] = ()  # where zlib must end blocks to reproduce it (a DEFLATE_BLOCKS piece)

    @property
    def decoded_length(self) -> int:
        """What its piece decodes to: the content, after the block list if it has one."""
        return self.content_length + (len(blocks_prefix(self.blocks)) if self.blocks else 0)


def _gzip_body(data: bytes, p: int) -> int | None:
    """Offset of a gzip member's deflate body (RFC 1952 header parsed), or None."""
    if p + 10 > len(data):
        return None
    flags = data[p + 3]
    if flags & 0xE0:
        return None
    q = p + 10
    if flags & 4:  # FEXTRA
        if q + 2 > len(data):
            return None
        q += 2 + int.from_bytes(data[q : q + 2], "little")
    for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            end = data.find(b"\0", q, q + 4096)
            if end < 0:
                return None
            q = end + 1
    if flags & 2:  # FHCRC
        q += 2
    return q if q < len(data) else None


def _inflate_at(view: memoryview, p: int, codec: Codec) -> tuple[int, bytes] | None:
    d = zlib.decompressobj(15 if codec is Codec.ZLIB else -15)
    try:
        out = d.decompress(view[p : p + MAX_CONTENT + (MAX_CONTENT >> 3)], MAX_CONTENT)
    except zlib.error:
        return None
    if not d.eof:
        return None
    n = min(len(view) - p, MAX_CONTENT + (MAX_CONTENT >> 3)) - len(d.unused_data)
    return (n, out) if n >= MIN_PACKED else None


Candidate = tuple[int, int, bytes, Codec, Sequence[int]]  # offset, length, content, codec, levels to try


def _prefix_matches(content: bytes, original: memoryview, codec: Codec, level: int, mem_level: int) -> bool:
    """Whether deflating `content` in steps keeps matching `original` to its end: a
    deflate never revises bytes it emitted, so a wrong level or memLevel is rejected at
    its first differing block, long before the whole content is compressed."""
    c = zlib.compressobj(level, zlib.DEFLATED, 15 if codec is Codec.ZLIB else -15, mem_level)
    at = 0
    for start in range(0, len(content), _STEP):
        out = c.compress(content[start : start + _STEP])
        if out != original[at : at + len(out)]:
            return False
        at += len(out)
    return c.flush(zlib.Z_FINISH) == original[at:]


def _verify(view: memoryview, candidate: Candidate) -> Stream | None:
    """The first (level, memLevel) the device's deflate reproduces the stream with: the likeliest
    is tried whole, the others first in steps (cheap rejection), then whole (what the device runs)."""
    p, n, content, codec, levels = candidate
    original = view[p : p + n]
    for k, (level, mem_level) in enumerate((lv, m) for lv in levels for m in _MEM_LEVELS):
        if k and not _prefix_matches(content, original, codec, level, mem_level):
            continue
        if deflate(content, codec, level, mem_level) == original:
            return Stream(p, n, codec, level, mem_level, len(content))
    if codec is not Codec.DEFLATE:
        return None
    # GNU gzip: zlib's matches, other block boundaries. Read them from the stream and try
    # the likeliest level with them (memLevel 9 holds gzip's 32 Ki symbols per block).
    ends = block_ends(original)
    if ends is None or ends[-1] != len(content) or len(ends) > _MAX_BLOCKS:
        return None
    blocks = [b - a for a, b in zip([0, *ends], ends, strict=False)][:-1]
    for mem_level in (9, 8):
        if deflate_blocks(content, blocks, levels[0], mem_level) == original:
            return Stream(p, n, codec, levels[0], mem_level, len(content), blocks=tuple(blocks))
    return None


def _candidates(
    data: bytes, within: Sequence[tuple[int, int]] | None, part: tuple[int, int] | None = None
) -> Iterator[Candidate]:
    """Every stream that inflates (wholly inside one of `within`, when given), in offset order
    per codec; a candidate outside `within` is never inflated. `part` [lo, hi): only
    streams whose header starts there (a stream may run past hi)."""
    view = memoryview(data)
    starts = [a for a, _ in within] if within is not None else []
    lo, hi = part if part is not None else (0, len(data))
    scan_to = min(len(data), hi + 16)  # a header that starts before hi ends by then

    def span_end(p: int) -> int | None:
        if within is None:
            return len(data)
        k = bisect.bisect_right(starts, p) - 1
        return within[k][1] if k >= 0 and p < within[k][1] else None

    for m in _GZIP.finditer(data, lo, scan_to):
        if m.start() >= hi:
            break
        body = _gzip_body(data, m.start())
        stop = span_end(body) if body is not None else None
        if body is None or stop is None:
            continue
        found = _inflate_at(view, body, Codec.DEFLATE)
        if found is not None and body + found[0] <= stop:
            xfl = data[m.start() + 8]
            levels = (9, 6, 1) if xfl == 2 else (1, 6, 9) if xfl == 4 else (6, 9, 1)
            yield body, found[0], found[1], Codec.DEFLATE, levels
    taken_until = -1
    for m in _ZLIB.finditer(data, lo, scan_to):
        p = m.start()
        if p >= hi:
            break
        if p < taken_until or (data[p] << 8 | data[p + 1]) % 31:
            continue
        stop = span_end(p)
        if stop is None:
            continue
        found = _inflate_at(view, p, Codec.ZLIB)
        if found is None:
            continue
        taken_until = p + found[0]
        if taken_until <= stop:
            yield p, found[0], found[1], Codec.ZLIB, _ZLIB_LEVELS[data[p + 1] >> 6]


def stream_starts(data: bytes, within: Sequence[tuple[int, int]]) -> list[int]:
    """Where a stream might start inside `within` (sorted, disjoint spans), without inflating
    anything: zlib headers (FCHECK valid) and the bodies of gzip member headers; sorted."""
    spans = [a for a, _ in within]

    def inside(p: int) -> bool:
        k = bisect.bisect_right(spans, p) - 1
        return k >= 0 and p < within[k][1]

    found: list[int] = []
    for start, end in within:
        for m in _ZLIB.finditer(data, start, end):
            p = m.start()
            if not (data[p] << 8 | data[p + 1]) % 31:
                found.append(p)
        for m in _GZIP.finditer(data, start, end):
            body = _gzip_body(data, m.start())
            if body is not None and inside(body):
                found.append(body)
    return sorted(set(found))


def _disjoint(results: Iterable[Stream | None]) -> list[Stream]:
    streams: list[Stream] = []
    end = -1
    for s in sorted((s for s in results if s is not None), key=lambda s: s.offset):
        if s.offset >= end:
            streams.append(s)
            end = s.offset + s.length
    return streams


def _scan(data: bytes, within: Sequence[tuple[int, int]] | None, pool: ThreadPoolExecutor | None) -> list[Candidate]:
    """`_candidates` over the whole of `data`, in parts of at least `_MIN_PART` bytes (at most
    `_MAX_PARTS`), each scanned on the pool (inflating releases the GIL). A part's first
    candidates may lie inside a stream that began in the part before: they do not inflate (a
    zlib stream ends with its Adler-32) or, if they did, `_disjoint` keeps the stream that
    starts first."""
    lo, hi = (within[0][0], within[-1][1]) if within else (0, len(data))
    count = min(_MAX_PARTS, (hi - lo) // _MIN_PART)
    if pool is None or count < 2:
        return list(_candidates(data, within))
    cuts = [lo + (hi - lo) * k // count for k in range(count + 1)]
    parts = pool.map(lambda k: list(_candidates(data, within, (cuts[k], cuts[k + 1]))), range(count))
    return [c for part in parts for c in part]


def find_streams(
    data: bytes,
    pool: ThreadPoolExecutor | None = None,
    *,
    verify: bool = True,
    within: Sequence[tuple[int, int]] | None = None,
    skip: set[int] | None = None,
) -> list[Stream]:
    """Non-overlapping streams of `data`, in offset order: verified ones (the device's
    deflate reproduces them; level and memLevel set), or with `verify` False every
    stream that inflates (level 0: good for a dictionary, which is only inflated; `verifying`
    checks them later). `within` (sorted, disjoint spans): only streams wholly inside one
    are inflated and kept; `skip`: the `hash()` of compressed bytes not wanted (a stream the
    base holds byte for byte stays raw bytes: nothing to verify, nothing to recompress)."""
    view = memoryview(data)
    candidates = _scan(data, within, pool)
    if skip:
        candidates = [c for c in candidates if hash(data[c[0] : c[0] + c[1]]) not in skip]

    def check(c: Candidate) -> Stream | None:
        if not verify:
            return Stream(c[0], c[1], c[3], 0, 0, len(c[2]), tuple(c[4]))
        return _verify(view, c)

    return _disjoint(pool.map(check, candidates) if pool is not None else map(check, candidates))


def _check(view: memoryview, s: Stream) -> Stream | None:
    content = zlib.decompress(view[s.offset : s.offset + s.length], 15 if s.codec is Codec.ZLIB else -15)
    return _verify(view, (s.offset, s.length, content, s.codec, s.levels))


def verifying(data: bytes, streams: Sequence[Stream], pool: ThreadPoolExecutor | None = None) -> Future[list[Stream]]:
    """Those of the unverified `streams` (from `find_streams(verify=False)`) that the device's
    deflate reproduces, with their level and memLevel (what `find_streams` would have kept),
    found on `pool` (one task per stream; zlib releases the GIL) while the caller does other
    work; without a pool it is done on return."""
    view = memoryview(data)
    done: Future[list[Stream]] = Future()
    if pool is None or not streams:
        done.set_result(_disjoint(_check(view, s) for s in streams))
        return done
    tasks = [pool.submit(_check, view, s) for s in streams]
    left = [len(tasks)]
    lock = threading.Lock()

    def finished(_: Future[Stream | None]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            done.set_result(_disjoint(t.result() for t in tasks))
        except BaseException as e:  # a check failed: the caller sees its error
            done.set_exception(e)

    for t in tasks:
        t.add_done_callback(finished)
    return done
