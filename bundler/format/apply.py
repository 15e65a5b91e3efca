"""Running one op: the single function every consumer of a bundle uses to turn
an op and its hash-checked payload into the bytes of its extent (the
installer, `ota-bundle verify`, the tests and the fuzzers).

Owns the source-reader seam: `ExtentSource` reads an extent of the base image
(the running slot of the image's class) or of the target image already
written, and `read_checked` hash-checks every such read before anything uses
it. The source is only asked for ranges the op table and the DELTA extent list
were checked to allow (bundler.format.ops); a source that returns something
else is caught by the hash.

`apply_op` returns the extent's bytes, or None for a ZERO op (the caller
writes `dst_length` zeros, cheaply: a hole or BLKZEROOUT). The op type alone
decides; a missing payload means nothing by itself. `run_op` is the same
function for a caller that writes the extent at once and can take a bytearray
(no copy of a SOURCE_COPY or recompressed extent).

Memory of one op: a SOURCE_COPY holds its extent once (<= MAX_OP_DST); a DELTA
its payload, its dictionary (<= MAX_DICT, read straight into one buffer, briefly
twice while zstd loads it) and its extent (plus its decoded pieces when it
recompresses). `op_memory` is that bound per op; the installer runs ops
concurrently only while the bounds of the ops in flight fit the bound of one
largest op (agent/oprunner.py, docs/bundle-format.md section 9.1).

`hints` reads, without trusting anything, which base ranges an op will read
(for read-ahead) and which ranges of the target written so far (it then starts
after the earlier ops that write them, agent/oprunner.py).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import struct
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from bundler.format import x86
from bundler.format.deflate import Codec, deflate, deflate_blocks, inflate, split_blocks
from bundler.format.errors import FormatError, HashMismatchError
from bundler.format.ops import (
    DELTA_EXTENT_SIZE,
    MAX_DICT_EXTENTS,
    MAX_OP_DST,
    MAX_PIECES,
    MAX_STREAM_EXTENT,
    PIECE_SIZE,
    Buffer,
    DeltaPayload,
    DictExtent,
    Op,
    OpType,
    Origin,
    Piece,
    parse_delta,
    produce,
    raw_dictionary,
)

RECOMPRESS_THREADS = max(1, min(4, os.cpu_count() or 1))
_pool_lock = threading.Lock()
_pool: list[ThreadPoolExecutor] = []  # made on first use


def _recompress_pool() -> ThreadPoolExecutor:
    """One pool for every op's recompression (a thread costs a start each)."""
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(max_workers=RECOMPRESS_THREADS, thread_name_prefix="deflate"))
        return _pool[0]


class SourceError(FormatError):
    """A source extent could not be read (short read, I/O error, no such source)."""


class ExtentSource(Protocol):
    """Reads extents for SOURCE_COPY and DELTA ops of one image."""

    def readinto(self, origin: Origin, offset: int, buf: memoryview, /) -> None:
        """Fill `buf` with the bytes at `offset` of the base (BASE) or target (TARGET)
        image, or raise SourceError."""
        ...


class NoSource:
    """The source of a full image: any source read is an error."""

    def readinto(self, origin: Origin, offset: int, buf: memoryview, /) -> None:
        raise SourceError(f"this image has no {origin.name.lower()} to read from", region="source")


def pread_into(fd: int, offset: int, buf: memoryview, what: str) -> None:
    done = 0
    try:
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise SourceError(f"{what} ends at {offset + done}, {len(buf) - done} bytes short", region="source")
            done += n
    except OSError as e:
        raise SourceError(f"cannot read {what} at {offset + done}: {e.strerror}", region="source") from None


def file_sha256(path: Path, length: int, chunk: int = 4 << 20) -> str:
    """SHA-256 of the first `length` bytes of a file or block device, read through the
    page cache (kept: the source extents read next are then served from memory)."""
    h = hashlib.sha256()
    buf = bytearray(min(chunk, max(length, 1)))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}", region="source") from None
    try:
        done = 0
        view = memoryview(buf)
        while done < length:
            n = min(len(buf), length - done)
            pread_into(fd, done, view[:n], str(path))
            h.update(view[:n])
            done += n
    finally:
        os.close(fd)
    return h.hexdigest()


class FileSource:
    """Base and target as files or block devices (each opened read-only here;
    the target's path may be None where no target can be read back)."""

    def __init__(self, base: Path | None, target: Path | None) -> None:
        self._fds: dict[Origin, int] = {}
        self._names = {Origin.BASE: str(base), Origin.TARGET: str(target)}
        try:
            for origin, path in ((Origin.BASE, base), (Origin.TARGET, target)):
                if path is not None:
                    self._fds[origin] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.close()
            raise SourceError(f"cannot open {e.filename}: {e.strerror}", region="source") from None

    def readinto(self, origin: Origin, offset: int, buf: memoryview, /) -> None:
        fd = self._fds.get(origin)
        if fd is None:
            raise SourceError(f"no {origin.name.lower()} image to read from", region="source")
        pread_into(fd, offset, buf, self._names[origin])

    def advise(self, origin: Origin, offset: int, length: int) -> None:
        """Start reading a range the next ops need into the page cache (a hint: errors are ignored)."""
        fd = self._fds.get(origin)
        if fd is not None and offset >= 0 and length > 0:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_checked(
    source: ExtentSource, origin: Origin, offset: int, buf: memoryview, *, sha256: bytes, index: int
) -> None:
    """Fill `buf` from the source and check it against the pinned hash."""
    source.readinto(origin, offset, buf)
    actual = hashlib.sha256(buf).digest()
    if actual != sha256:
        what = f"{origin.name.lower()} source extent at {offset} (+{len(buf)})"
        raise HashMismatchError(what, sha256.hex(), actual.hex(), op_index=index)


def apply_op(
    op: Op, payload: Buffer | None, index: int, source: ExtentSource, base_size: int = 0
) -> bytes | None:
    """The bytes op `index` produces, every input checked before use: the
    payload was hash-checked by the reader, source extents are checked here,
    the produced extent against `dst_sha256`. None for ZERO."""
    extent = run_op(op, payload, index, source, base_size)
    return extent if extent is None or isinstance(extent, bytes) else bytes(extent)


def run_op(
    op: Op, payload: Buffer | None, index: int, source: ExtentSource, base_size: int = 0
) -> bytes | bytearray | None:
    """`apply_op` without the copy into immutable bytes (the installer writes the extent at once)."""
    if op.type is OpType.ZERO:
        return None
    if op.type is OpType.SOURCE_COPY:
        buf = bytearray(op.dst_length)
        read_checked(source, Origin.BASE, op.src_offset, memoryview(buf), sha256=op.dst_sha256, index=index)
        return buf
    if payload is None:
        raise FormatError(f"op {index}: {op.type.name} op without its payload", region="payload")
    if op.type is OpType.REPLACE:
        return produce(op, payload, index)
    delta = parse_delta(op, payload, index, base_size)
    dictionary = bytearray(op.src_length)
    streams = _fill_dictionary(dictionary, delta, index, source)
    loaded = raw_dictionary(dictionary) if delta.extents else None
    del dictionary  # the library's copy is the one used: hold the dictionary once while decoding
    if not delta.pieces:
        return produce(op, delta.frame, index, loaded, None)
    holder = [produce(op, delta.frame, index, loaded, delta.decoded_length)]
    del loaded  # not held while recompressing

    def reuse(piece: Piece, content: memoryview) -> bytearray | None:
        """The packed bytes of a dictionary stream that inflates to exactly this piece's
        content, as the guess of what recompressing it yields (see _recompress)."""
        extent = streams.get((piece.codec, piece.in_length, zlib.crc32(content)))
        if extent is None or extent.length != piece.out_length:
            return None
        packed = bytearray(extent.length)
        read_checked(source, extent.origin, extent.offset, memoryview(packed), sha256=extent.sha256, index=index)
        if piece.codec is Codec.ZLIB and packed[1] >> 6 != _zlib_level_class(piece.level):
            return None  # its header says another level made it
        return packed

    return _recompress(op, holder, delta.pieces, index, reuse if streams else None)


def _zlib_level_class(level: int) -> int:
    """The FLEVEL a zlib header written by deflate at `level` carries (RFC 1950; zlib's deflate.c)."""
    return 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3


def _fill_dictionary(
    dictionary: bytearray, delta: DeltaPayload, index: int, source: ExtentSource
) -> dict[tuple[Codec, int, int], DictExtent]:
    """Read every dictionary extent into `dictionary`, each hash-checked; stream
    extents are inflated on the shared pool, several at once while their packed and
    inflated bytes together stay within MAX_STREAM_EXTENT (or one alone). Returns,
    for a DELTA with pieces, its streams by (codec, inflated length, CRC-32)."""
    view = memoryview(dictionary)
    streams: dict[tuple[Codec, int, int], DictExtent] = {}
    pool = _recompress_pool()
    flight: collections.deque[tuple[Future[int], DictExtent, int]] = collections.deque()
    held = 0

    def inflate_into(k: int, extent: DictExtent, into: memoryview) -> int:
        packed = bytearray(extent.length)
        read_checked(source, extent.origin, extent.offset, memoryview(packed), sha256=extent.sha256, index=index)
        into[:] = inflate(packed, extent.codec, extent.produces, f"op {index}: dictionary extent {k}")
        return zlib.crc32(into) if delta.pieces else 0

    def settle() -> None:
        nonlocal held
        job, extent, cost = flight.popleft()
        held -= cost
        streams.setdefault((extent.codec, extent.produces, job.result()), extent)

    try:
        at = 0
        for k, extent in enumerate(delta.extents):
            into = view[at : at + extent.produces]
            at += extent.produces
            if extent.codec in (Codec.RAW, Codec.X86):
                read_checked(source, extent.origin, extent.offset, into, sha256=extent.sha256, index=index)
                if extent.codec is Codec.X86:
                    x86.encode_into(into, extent.start)  # filtered where it was read: no copy
                continue
            cost = extent.length + extent.produces
            while flight and held + cost > MAX_STREAM_EXTENT:
                settle()
            flight.append((pool.submit(inflate_into, k, extent, into), extent, cost))
            held += cost
            del into
        while flight:
            settle()
    finally:
        for job, _, _ in flight:
            if not job.cancel():
                job.exception()  # nothing writes into the dictionary once this returns
    if not delta.pieces:
        streams.clear()
    return streams


def op_memory(op: Op, payload: Buffer | None = None) -> int:
    """An upper bound of the bytes `run_op` holds for `op`, its payload included:
    ZERO nothing; SOURCE_COPY its extent; REPLACE its payload (or a local copy of
    its extent, agent.adaptive) and its extent; DELTA its payload and the larger
    of its phases: building the dictionary (the dictionary, one stream extent's
    packed and inflated bytes), decoding (the dictionary twice: the library's copy
    and zstd's, and the decoded bytes), recompressing (decoded pieces,
    recompressed pieces, the extent). Given a DELTA's payload, its piece records
    say how much it decodes; without it the bound assumes the most."""
    if op.type is OpType.ZERO:
        return 0
    if op.type is OpType.SOURCE_COPY:
        return op.dst_length
    held = max(op.payload_length, op.dst_length)
    if op.type is OpType.REPLACE:
        return held + op.dst_length
    decoded = MAX_OP_DST if payload is None else _decoded_bound(op, payload)
    build = 2 * op.src_length + (MAX_STREAM_EXTENT if op.src_length else 0)
    return held + max(build, 2 * op.src_length + decoded, decoded + 2 * op.dst_length)


def _decoded_bound(op: Op, payload: Buffer) -> int:
    view = memoryview(payload).cast("B")
    if len(view) < 8:
        return MAX_OP_DST
    count, npieces = struct.unpack_from("<II", view)
    at = 8 + count * DELTA_EXTENT_SIZE
    if count > MAX_DICT_EXTENTS or npieces > MAX_PIECES or len(view) < at + npieces * PIECE_SIZE:
        return MAX_OP_DST
    if not npieces:
        return op.dst_length
    decoded: int = sum(_PIECE_IN.unpack_from(view, at + k * PIECE_SIZE)[0] for k in range(npieces))
    return min(max(decoded, op.dst_length), MAX_OP_DST)  # parse_delta refuses more than MAX_OP_DST


_PIECE_IN = struct.Struct("<4xI")  # codec, level, mem_level, reserved; in_length of a piece record


def _recompress(
    op: Op,
    holder: list[bytes],
    pieces: tuple[Piece, ...],
    index: int,
    reuse: Callable[[Piece, memoryview], bytearray | None] | None = None,
) -> bytearray:
    """The extent from a deflate-aware DELTA's decoded pieces (bundler.format.deflate),
    checked against dst_sha256. `holder` hands over the only reference to the decoded
    bytes, so they are freed before the extent is returned.

    Recompressing is most of a deflate-aware delta's apply time, and most pieces of
    an update are content the base already holds compressed (an unchanged squashfs
    block that moved). `reuse` offers, for a piece whose content equals an inflated
    dictionary stream (same codec, length, CRC-32 and compressed length), that
    stream's hash-checked compressed bytes instead of deflating it again. That is a
    guess (the same content deflated at the piece's level need not give the same
    bytes), checked like everything else by the extent's SHA-256; if the check
    fails, every piece is recompressed and the extent checked again."""
    src = [memoryview(holder.pop())]  # cleared at the end: the decoded bytes go with it
    spans: list[tuple[int, int, Piece]] = []  # (decoded offset, output offset, piece)
    at = done = 0
    for piece in pieces:
        spans.append((at, done, piece))
        at += piece.in_length
        done += piece.out_length
    try:
        out, guessed = _pieces(op, src[0], spans, index, reuse)
        actual = hashlib.sha256(out).digest()
        if guessed and actual != op.dst_sha256:
            del out
            out, _ = _pieces(op, src[0], spans, index, None)
            actual = hashlib.sha256(out).digest()
    finally:
        src.clear()
    if actual != op.dst_sha256:
        raise HashMismatchError("produced extent", op.dst_sha256.hex(), actual.hex(), op_index=index)
    return out


def _pieces(
    op: Op,
    decoded: memoryview,
    spans: list[tuple[int, int, Piece]],
    index: int,
    reuse: Callable[[Piece, memoryview], bytearray | None] | None,
) -> tuple[bytearray, bool]:
    """(the extent made of every piece, whether any piece was a reused guess)."""
    out = bytearray(op.dst_length)
    guessed = [False]

    def make(span: tuple[int, int, Piece]) -> bytes | bytearray | memoryview:
        start, _, piece = span
        content = decoded[start : start + piece.in_length]
        if piece.codec is Codec.RAW:
            return content
        if piece.codec is Codec.X86:
            return x86.decode(content, op.dst_offset + span[1])  # its start: where it sits in the image
        if piece.codec is Codec.DEFLATE_BLOCKS:
            blocks, body = split_blocks(content, f"op {index}: output piece {spans.index(span)}")
            return deflate_blocks(body, blocks, piece.level, piece.mem_level)
        if reuse is not None:
            packed = reuse(piece, content)
            if packed is not None:
                guessed[0] = True
                return packed
        return deflate(content, piece.codec, piece.level, piece.mem_level)

    # Pieces are independent and zlib releases the GIL: recompress them on every core
    # (one shared pool; a piece that is copied costs nothing and stays on this thread).
    pool = _recompress_pool()
    jobs = [pool.submit(make, span) if span[2].codec is not Codec.RAW else None for span in spans]
    try:
        for k, (span, job) in enumerate(zip(spans, jobs, strict=True)):
            _, where, piece = span
            packed = make(span) if job is None else job.result()
            jobs[k] = None
            if len(packed) != piece.out_length:
                raise FormatError(
                    f"op {index}: output piece {k} recompresses to {len(packed)} bytes, not {piece.out_length}"
                    " (this device's zlib deflates differently)", region="payload",
                )
            out[where : where + piece.out_length] = packed
            del packed
    finally:
        for job in jobs:
            if job is not None and not job.cancel():
                job.exception()  # wait: the decoded bytes must not be in use when they are freed
    return out, guessed[0]


_ORIGIN_AND_RANGE = struct.Struct("<B7xQQ")  # origin, codec, reserved; offset, length of a dictionary extent record
_COUNT = struct.Struct("<I")


def hints(op: Op, payload: Buffer | None) -> tuple[list[tuple[Origin, int, int]], list[tuple[int, int]] | None]:
    """(base ranges the op will read, target ranges it reads from what earlier ops
    wrote), read from the records without trusting them: run_op checks everything
    itself. The target ranges are None when a DELTA payload is too short or too
    malformed to tell: the op is then taken to read anything written so far."""
    if op.type is OpType.SOURCE_COPY:
        return [(Origin.BASE, op.src_offset, op.src_length)], []
    if op.type is not OpType.DELTA or payload is None:
        return [], []
    view = memoryview(payload).cast("B")
    if len(view) < 8:
        return [], None
    (count,) = _COUNT.unpack_from(view)
    if count > MAX_DICT_EXTENTS or len(view) < 8 + count * DELTA_EXTENT_SIZE:
        return [], None
    ranges: list[tuple[Origin, int, int]] = []
    target: list[tuple[int, int]] = []
    for k in range(count):
        origin, offset, length = _ORIGIN_AND_RANGE.unpack_from(view, 8 + k * DELTA_EXTENT_SIZE)
        if origin == Origin.BASE:
            ranges.append((Origin.BASE, offset, length))
        else:
            target.append((offset, length))
    return ranges, target
