"""Finding the compressed streams of an image that the device can reproduce.

Scans an image for zlib streams (RFC 1950 headers, as squashfs writes its
blocks) and gzip members (their raw deflate body, as .gz files inside an ext4
image hold), inflates each candidate, and keeps a stream only if
`bundler.format.deflate.deflate` (the exact deflate the device runs) with
some level and memLevel reproduces its bytes exactly. Everything else stays
raw bytes. Host-side only; the verification runs on a pool of threads (zlib
releases the GIL).
"""

from __future__ import annotations

import bisect
import re
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bundler.format.deflate import Codec, deflate

MAX_CONTENT = 2 << 20  # larger streams stay raw (an op decodes at most 4 MiB)
MAX_PACKED = 1 << 20  # bundler.format.ops.MAX_STREAM_EXTENT: what a dictionary extent may inflate
MIN_PACKED = 64  # smaller streams are not worth a piece record
_ZLIB = re.compile(b"\x78[\x01\x5e\x9c\xda]")
_GZIP = re.compile(b"\x1f\x8b\x08")
_ZLIB_LEVELS = {0: (1,), 1: (2, 3, 4, 5), 2: (6,), 3: (9, 8, 7)}  # by the header's FLEVEL hint
_MEM_LEVELS = (8, 9)
_STEP = 64 << 10  # content bytes fed per step when a (level, memLevel) is tried in steps


@dataclass(frozen=True, slots=True)
class Stream:
    offset: int
    length: int  # compressed bytes in the image
    codec: Codec
    level: int
    mem_level: int
    content_length: int


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
    return None


def find_streams(
    data: bytes,
    pool: ThreadPoolExecutor | None = None,
    *,
    verify: bool = True,
    within: Sequence[tuple[int, int]] | None = None,
) -> list[Stream]:
    """Non-overlapping streams of `data`, in offset order: verified ones (the device's
    deflate reproduces them; level and memLevel set), or with `verify` False every
    stream that inflates (level 0: good for a dictionary, which is only inflated).
    `within` (sorted, disjoint spans): only streams wholly inside one are verified and kept."""
    view = memoryview(data)
    candidates: list[Candidate] = []
    for m in _GZIP.finditer(data):
        body = _gzip_body(data, m.start())
        if body is None:
            continue
        found = _inflate_at(view, body, Codec.DEFLATE)
        if found is not None:
            xfl = data[m.start() + 8]
            levels = (9, 6, 1) if xfl == 2 else (1, 6, 9) if xfl == 4 else (6, 9, 1)
            candidates.append((body, found[0], found[1], Codec.DEFLATE, levels))
    taken_until = -1
    for m in _ZLIB.finditer(data):
        p = m.start()
        if p < taken_until or (data[p] << 8 | data[p + 1]) % 31:
            continue
        found = _inflate_at(view, p, Codec.ZLIB)
        if found is None:
            continue
        candidates.append((p, found[0], found[1], Codec.ZLIB, _ZLIB_LEVELS[data[p + 1] >> 6]))
        taken_until = p + found[0]

    if within is not None:
        starts = [a for a, _ in within]

        def inside(c: Candidate) -> bool:
            k = bisect.bisect_right(starts, c[0]) - 1
            return k >= 0 and c[0] + c[1] <= within[k][1]

        candidates = [c for c in candidates if inside(c)]

    def check(c: Candidate) -> Stream | None:
        if not verify:
            return Stream(c[0], c[1], c[3], 0, 0, len(c[2]))
        return _verify(view, c)

    results = list(pool.map(check, candidates)) if pool is not None else [check(c) for c in candidates]
    streams: list[Stream] = []
    end = -1
    for s in sorted((s for s in results if s is not None), key=lambda s: s.offset):
        if s.offset >= end:
            streams.append(s)
            end = s.offset + s.length
    return streams
