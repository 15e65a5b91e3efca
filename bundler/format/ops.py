"""Operation records: what each extent of the target image is made of.

Owns the fixed 128-byte record layout, structural validation of an op table
against the manifest (destination coverage, payload contiguity, size bounds),
and turning one op plus its verified payload into the bytes of its extent.
It does not read streams or write slots.

`OpTable` keeps a table as its raw records and unpacks one `Op` at a time:
32,768 ops are 4 MiB of records but ~13 MiB as Python objects, which the
install memory bound (docs/bundle-format.md section 9.1) cannot afford.

Op types: ZERO (no payload), REPLACE (one zstd frame), SOURCE_COPY (an extent
of the base image, no payload) and DELTA (a list of dictionary extents, then
one zstd frame decoded with their concatenation as a raw-content dictionary).
SOURCE_COPY and DELTA appear only in images that name a base
(docs/bundle-format.md section 6.2). Running an op is `bundler.format.apply`.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import zstandard

from bundler.format.deflate import DEFLATE_CODECS, RECOMPRESSED, Codec
from bundler.format.errors import BoundsError, FormatError, HashMismatchError
from bundler.format.header import OP_RECORD_SIZE

BLOCK_SIZE = 4096
MAX_OP_DST = 4 << 20  # produced bytes of one REPLACE/DELTA/SOURCE_COPY op: bounds install memory
# ZSTD_COMPRESSBOUND(MAX_OP_DST): no zstd encoder's one-shot frame of MAX_OP_DST bytes is larger.
MAX_OP_PAYLOAD = MAX_OP_DST + (MAX_OP_DST >> 8)
MAX_WINDOW = MAX_OP_DST  # a frame's window never needs to exceed the op it produces
MAX_DICT = 8 << 20  # dictionary bytes of one DELTA op (the sum of its extents' outputs)
MAX_DICT_EXTENTS = 256
MAX_STREAM_EXTENT = 1 << 20  # source bytes of one inflated (ZLIB/DEFLATE) dictionary extent
MAX_PIECES = 4096
MAX_DELTA_WINDOW = 16 << 20  # covers MAX_DICT + MAX_OP_DST, rounded up to a power of two
DELTA_EXTENT_SIZE = 64  # one dictionary extent record in a DELTA payload
PIECE_SIZE = 16  # one output piece record
# A DELTA payload: u32 extent count, u32 piece count, the extent records, the piece
# records, then one zstd frame of at most MAX_OP_PAYLOAD.
MAX_DELTA_PAYLOAD = 8 + MAX_DICT_EXTENTS * DELTA_EXTENT_SIZE + MAX_PIECES * PIECE_SIZE + MAX_OP_PAYLOAD
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Buffer = bytes | bytearray | memoryview  # what produce() and the table accept: any contiguous bytes

_STRUCT = struct.Struct("<B7sQQQQQQ32s32s8s")
assert _STRUCT.size == OP_RECORD_SIZE
NO_HASH = bytes(32)


class OpType(enum.IntEnum):
    ZERO = 0
    REPLACE = 1
    SOURCE_COPY = 2
    DELTA = 3


SUPPORTED = frozenset(OpType)
NEEDS_BASE = frozenset({OpType.SOURCE_COPY, OpType.DELTA})


class Origin(enum.IntEnum):
    """Where a DELTA dictionary extent is read from."""

    BASE = 0  # the base image (the running slot of the image's class)
    TARGET = 1  # the target image, before this op's destination (already written)


@dataclass(frozen=True, slots=True)
class DictExtent:
    """`length` bytes at `offset` of the origin (whose SHA-256 is `sha256`), put into
    the dictionary as they are (RAW), inflated (ZLIB, DEFLATE) to `out_length` bytes,
    or x86-filtered (X86: `bundler.format.x86.encode` with `start`, same length)."""

    origin: Origin
    offset: int
    length: int
    sha256: bytes
    codec: Codec = Codec.RAW
    out_length: int = -1  # -1: length (RAW, X86)
    start: int = 0  # X86: the filter's start position, a u32 in the record's first reserved bytes

    @property
    def produces(self) -> int:
        return self.length if self.out_length < 0 else self.out_length

    def pack(self) -> bytes:
        spare = self.start.to_bytes(4, "little") + bytes(2) if self.codec is Codec.X86 else bytes(6)
        return _EXTENT.pack(self.origin, self.codec, spare, self.offset, self.length, self.produces, self.sha256)


@dataclass(frozen=True, slots=True)
class Piece:
    """One stretch of a deflate-aware DELTA's output: `in_length` decoded bytes,
    copied (RAW), recompressed (bundler.format.deflate) into `out_length` bytes, or
    x86-unfiltered (X86: `bundler.format.x86.decode`, same length, its start the
    piece's own offset in the image)."""

    codec: Codec
    in_length: int
    out_length: int
    level: int = 0
    mem_level: int = 0

    def pack(self) -> bytes:
        return _PIECE.pack(self.codec, self.level, self.mem_level, 0, self.in_length, self.out_length)


@dataclass(frozen=True, slots=True)
class DeltaPayload:
    extents: tuple[DictExtent, ...]
    pieces: tuple[Piece, ...]  # empty: the decoded frame is the extent itself
    frame: memoryview

    @property
    def decoded_length(self) -> int | None:
        return sum(p.in_length for p in self.pieces) if self.pieces else None


_EXTENT = struct.Struct("<BB6sQQQ32s")
assert _EXTENT.size == DELTA_EXTENT_SIZE
_PIECE = struct.Struct("<BBBBIQ")
assert _PIECE.size == PIECE_SIZE
_COUNTS = struct.Struct("<II")


def pack_delta(extents: Sequence[DictExtent], pieces: Sequence[Piece], frame: bytes) -> bytes:
    head = _COUNTS.pack(len(extents), len(pieces))
    return head + b"".join(e.pack() for e in extents) + b"".join(p.pack() for p in pieces) + frame


def _bad(index: int, message: str) -> FormatError:
    return FormatError(f"op {index}: {message}", region="payload")


def parse_delta(op: Op, payload: Buffer, index: int, base_size: int) -> DeltaPayload:
    """The dictionary extents, output pieces and frame of a (hash-checked) DELTA
    payload. Every record is checked before anything is read: 0 to
    MAX_DICT_EXTENTS extents whose outputs sum to the op's src_length, base
    extents inside the base image, target extents wholly before the op's
    destination, no two of one origin overlapping; pieces whose outputs sum to
    dst_length from at most MAX_OP_DST decoded bytes, with valid deflate levels."""
    view = memoryview(payload).cast("B")
    region = f"op {index}"
    if len(view) < _COUNTS.size:
        raise _bad(index, "DELTA payload has no extent and piece counts")
    count, npieces = _COUNTS.unpack_from(view)
    if not 0 <= count <= MAX_DICT_EXTENTS:
        raise BoundsError("dictionary extents", count, 0, MAX_DICT_EXTENTS, region=region)
    if npieces > MAX_PIECES:
        raise BoundsError("output pieces", npieces, 0, MAX_PIECES, region=region)
    pieces_at = _COUNTS.size + count * DELTA_EXTENT_SIZE
    start = pieces_at + npieces * PIECE_SIZE
    if len(view) <= start:
        raise _bad(index, "DELTA payload ends inside its extent or piece list")
    extents: list[DictExtent] = []
    total = 0
    for k in range(count):
        kind, codec, reserved, offset, length, produced, digest = _EXTENT.unpack_from(
            view, _COUNTS.size + k * DELTA_EXTENT_SIZE
        )
        spare = reserved[4:] if codec == Codec.X86 else reserved  # X86: a u32 start, then 2 reserved
        if spare != bytes(len(spare)) or kind not in _ORIGINS or codec not in _EXTENT_CODECS:
            raise _bad(index, f"dictionary extent {k} has an unknown origin, codec or reserved bytes")
        origin, how = Origin(kind), Codec(codec)
        x86_start = int.from_bytes(reserved[:4], "little") if how is Codec.X86 else 0
        limit = base_size if origin is Origin.BASE else op.dst_offset
        if not 1 <= length <= MAX_DICT or offset > limit or length > limit - offset:
            where = "the base image" if origin is Origin.BASE else "the target written before this op"
            raise BoundsError(
                f"dictionary extent {k} [{offset}, +{length})", offset + length, 1, limit,
                region=f"{region} (outside {where})",
            )
        if how in _SAME_LENGTH and produced != length:
            raise _bad(index, f"{how.name.lower()} dictionary extent {k} of {length} bytes says it yields {produced}")
        if how in DEFLATE_CODECS and (length > MAX_STREAM_EXTENT or not 1 <= produced <= MAX_DICT):
            raise BoundsError(f"stream extent {k} length", length, 1, MAX_STREAM_EXTENT, region=region)
        total += produced
        extents.append(DictExtent(origin, offset, length, digest, how, produced, x86_start))
    if total != op.src_length:
        raise _bad(index, f"dictionary extents hold {total} bytes, op says {op.src_length}")
    for origin in Origin:
        spans = sorted((e.offset, e.offset + e.length) for e in extents if e.origin is origin)
        for (_, end), (next_start, _) in itertools.pairwise(spans):
            if next_start < end:
                raise _bad(index, f"dictionary extents overlap at {origin.name} offset {next_start}")
    pieces: list[Piece] = []
    decoded = produced_total = 0
    for k in range(npieces):
        record = _PIECE.unpack_from(view, pieces_at + k * PIECE_SIZE)
        codec, level, mem_level, reserved_byte, in_length, out_length = record
        if codec not in _CODECS or reserved_byte:
            raise _bad(index, f"output piece {k} has an unknown codec or reserved bytes")
        how = Codec(codec)
        if how in _SAME_LENGTH and (level or mem_level or in_length != out_length):
            raise _bad(index, f"{how.name.lower()} output piece {k} has a level or changes the length")
        if how in RECOMPRESSED and not (1 <= level <= 9 and 1 <= mem_level <= 9):
            raise _bad(index, f"output piece {k}: deflate level {level} / memLevel {mem_level} outside 1..9")
        if out_length < 1:
            raise _bad(index, f"output piece {k} produces nothing")
        decoded += in_length
        produced_total += out_length
        pieces.append(Piece(how, in_length, out_length, level, mem_level))
    if pieces and decoded > MAX_OP_DST:
        raise BoundsError("decoded bytes", decoded, 1, MAX_OP_DST, region=region)
    if pieces and produced_total != op.dst_length:
        raise _bad(index, f"output pieces produce {produced_total} bytes, op has {op.dst_length}")
    return DeltaPayload(tuple(extents), tuple(pieces), view[start:])


_ORIGINS = frozenset(Origin)
_CODECS = frozenset(Codec)
_EXTENT_CODECS = frozenset(Codec) - {Codec.DEFLATE_BLOCKS}
_SAME_LENGTH = frozenset({Codec.RAW, Codec.X86})


@dataclass(frozen=True, slots=True)
class Op:
    type: OpType
    dst_offset: int
    dst_length: int
    payload_offset: int = 0
    payload_length: int = 0
    payload_sha256: bytes = NO_HASH
    dst_sha256: bytes = NO_HASH
    src_offset: int = 0
    src_length: int = 0

    def pack(self) -> bytes:
        return _STRUCT.pack(
            self.type,
            bytes(7),
            self.dst_offset,
            self.dst_length,
            self.src_offset,
            self.src_length,
            self.payload_offset,
            self.payload_length,
            self.payload_sha256,
            self.dst_sha256,
            bytes(8),
        )

    @classmethod
    def unpack(cls, raw: Buffer, index: int) -> Op:
        if len(raw) != OP_RECORD_SIZE:
            raise FormatError(f"op {index}: record is {len(raw)} bytes, not {OP_RECORD_SIZE}", region="op table")
        fields = _STRUCT.unpack(raw)
        _check_record(fields, index)
        return _op(fields)


_RESERVED_1, _RESERVED_2 = bytes(7), bytes(8)
_TYPES = frozenset(OpType)
_Record = tuple[int, bytes, int, int, int, int, int, int, bytes, bytes, bytes]


def _check_record(fields: _Record, index: int) -> None:
    if fields[1] != _RESERVED_1 or fields[10] != _RESERVED_2:
        raise FormatError(f"op {index}: reserved bytes are not zero", region="op table")
    if fields[0] not in _TYPES:
        raise FormatError(f"op {index}: unknown op type {fields[0]}", region="op table")


def _op(fields: _Record) -> Op:
    kind, _, dst_off, dst_len, src_off, src_len, p_off, p_len, p_hash, d_hash, _ = fields
    return Op(OpType(kind), dst_off, dst_len, p_off, p_len, p_hash, d_hash, src_off, src_len)


class OpTable(Sequence[Op]):
    """A checked op table held as its raw records (128 bytes per op), each `Op`
    unpacked when it is looked at. Slices share the records. Made by
    `unpack_table`, which checks every record's reserved bytes and type."""

    __slots__ = ("_count", "_view")

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._count = len(view) // OP_RECORD_SIZE

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> Op: ...
    @overload
    def __getitem__(self, index: slice) -> OpTable: ...
    def __getitem__(self, index: int | slice) -> Op | OpTable:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step != 1:
                raise ValueError("an op table slice must be contiguous")
            stop = max(start, stop)
            return OpTable(self._view[start * OP_RECORD_SIZE : stop * OP_RECORD_SIZE])
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("op index out of range")
        return _op(_STRUCT.unpack_from(self._view, index * OP_RECORD_SIZE))

    def __iter__(self) -> Iterator[Op]:
        for fields in _STRUCT.iter_unpack(self._view):
            yield _op(fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OpTable):
            return self._view == other._view
        if isinstance(other, list | tuple):
            return len(other) == self._count and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OpTable({self._count} ops)"

    def raw(self) -> bytes:
        return self._view.tobytes()


def pack_table(ops: Sequence[Op]) -> bytes:
    if isinstance(ops, OpTable):
        return ops.raw()
    return b"".join(op.pack() for op in ops)


def unpack_table(raw: Buffer) -> OpTable:
    """Check every record (reserved bytes zero, known type) in one pass and keep
    the records as they are. The table takes `raw` over: do not change it after."""
    view = memoryview(raw).cast("B").toreadonly()
    if len(view) % OP_RECORD_SIZE:
        raise FormatError(f"op table length {len(view)} is not a multiple of {OP_RECORD_SIZE}", region="op table")
    for index, fields in enumerate(_STRUCT.iter_unpack(view)):
        _check_record(fields, index)
    return OpTable(view)


def validate_image_ops(
    ops: Sequence[Op], first_index: int, image_size: int, payload_cursor: int, base_size: int | None = None
) -> int:
    """Check one image's ops: contiguous destination coverage of [0, size) in order,
    payload pieces contiguous in the same order, every length within bounds,
    source extents inside the base (only an image with a base may have them).
    Returns the payload cursor after this image."""
    dst = 0
    for i, op in enumerate(ops, start=first_index):
        if op.type not in SUPPORTED:
            raise FormatError(f"op {i}: {op.type.name} is not supported by this reader", region="op table")
        if op.type in NEEDS_BASE and base_size is None:
            raise FormatError(f"op {i}: {op.type.name} in an image without a base image", region="op table")
        if op.type in (OpType.ZERO, OpType.REPLACE) and (op.src_offset or op.src_length):
            raise FormatError(f"op {i}: {op.type.name} op carries a source extent", region="op table")
        if op.dst_offset != dst:
            raise FormatError(f"op {i}: destination offset {op.dst_offset}, expected {dst}", region="op table")
        if op.dst_length <= 0 or op.dst_offset + op.dst_length > image_size:
            raise BoundsError("dst_length", op.dst_length, 1, image_size - op.dst_offset, region=f"op {i}")
        no_payload = op.type in {OpType.ZERO, OpType.SOURCE_COPY}
        if no_payload and (op.payload_length != 0 or op.payload_offset != 0 or op.payload_sha256 != NO_HASH):
            raise FormatError(f"op {i}: {op.type.name} op carries payload", region="op table")
        if op.type is OpType.SOURCE_COPY:
            assert base_size is not None
            if op.dst_length > MAX_OP_DST:
                raise BoundsError("dst_length", op.dst_length, 1, MAX_OP_DST, region=f"op {i}")
            if op.src_length != op.dst_length:
                message = f"op {i}: SOURCE_COPY of {op.src_length} bytes into {op.dst_length}"
                raise FormatError(message, region="op table")
            if op.src_offset > base_size or op.src_length > base_size - op.src_offset:
                where = f"op {i} (source outside the {base_size}-byte base image)"
                raise BoundsError("src extent end", op.src_offset + op.src_length, 1, base_size, region=where)
        elif op.type is not OpType.ZERO:
            if op.dst_length > MAX_OP_DST:
                raise BoundsError("dst_length", op.dst_length, 1, MAX_OP_DST, region=f"op {i}")
            most = MAX_DELTA_PAYLOAD if op.type is OpType.DELTA else MAX_OP_PAYLOAD
            if not 1 <= op.payload_length <= most:
                raise BoundsError("payload_length", op.payload_length, 1, most, region=f"op {i}")
            if op.type is OpType.DELTA:
                if op.src_offset != 0:
                    raise FormatError(f"op {i}: DELTA op has a src_offset", region="op table")
                if not 0 <= op.src_length <= MAX_DICT:
                    raise BoundsError("dictionary length", op.src_length, 0, MAX_DICT, region=f"op {i}")
            if op.payload_offset != payload_cursor:
                raise FormatError(
                    f"op {i}: payload offset {op.payload_offset}, expected {payload_cursor}", region="op table"
                )
            payload_cursor += op.payload_length
        dst += op.dst_length
    if dst != image_size:
        raise FormatError(f"ops cover {dst} bytes of a {image_size}-byte image", region="op table")
    return payload_cursor


def raw_dictionary(content: Buffer) -> zstandard.ZstdCompressionDict:
    """A DELTA's dictionary as zstd raw content (the library keeps its own copy)."""
    return zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def produce(
    op: Op,
    payload: Buffer,
    index: int,
    dictionary: zstandard.ZstdCompressionDict | None = None,
    decoded_length: int | None = None,
) -> bytes:
    """The extent an op produces from its (already hash-checked) payload, checked
    against the op's pinned destination hash. Not for ZERO ops.

    The frame header is checked before anything is decoded: zstd magic, no
    dictionary, window <= MAX_WINDOW, and a declared content size equal to
    dst_length. With the size declared and the whole frame in memory, the decoder
    writes straight into one dst_length buffer and allocates no window of its own;
    the declared size is what it allocates, so it must match first.

    A DELTA's frame (`payload` is then the frame after the extent list) is
    decoded with `dictionary`, the concatenation of its checked extents loaded
    as raw content (`raw_dictionary`); its window may reach MAX_DELTA_WINDOW (dictionary plus extent).
    `decoded_length` replaces dst_length where the frame decodes to a deflate-aware
    DELTA's uncompressed pieces; the caller checks the hash of what it makes of them."""
    if op.type is OpType.REPLACE:
        if dictionary is not None:
            raise FormatError(f"op {index}: a REPLACE op has no dictionary", region="op table")
        window = MAX_WINDOW
    elif op.type is OpType.DELTA:
        window = MAX_DELTA_WINDOW
    else:
        raise FormatError(f"op {index}: cannot produce {op.type.name} here", region="op table")
    if bytes(memoryview(payload)[:4]) != ZSTD_MAGIC:
        raise FormatError(f"op {index}: payload is not a zstd frame (bad magic number)", region="payload")
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise FormatError(f"op {index}: payload is not a zstd frame: {e}", region="payload") from None
    if params.dict_id:
        raise FormatError(f"op {index}: zstd frame needs dictionary {params.dict_id}", region="payload")
    if params.window_size > window:
        raise BoundsError("zstd window", params.window_size, 0, window, region=f"op {index}")
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise FormatError(f"op {index}: zstd frame does not declare its content size", region="payload")
    expected = op.dst_length if decoded_length is None else decoded_length
    if params.content_size != expected:
        what = "op has" if decoded_length is None else "pieces take"
        message = f"op {index}: zstd frame declares {params.content_size} bytes, {what} {expected}"
        raise FormatError(message, region="payload")
    try:
        if dictionary is None:
            decoder = zstandard.ZstdDecompressor(max_window_size=window)
        else:
            decoder = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=window)
        data: bytes = decoder.decompress(payload, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise FormatError(f"op {index}: zstd frame does not decode: {e}", region="payload") from None
    if len(data) != expected:
        raise FormatError(f"op {index}: decoded {len(data)} bytes, expected {expected}", region="payload")
    if decoded_length is not None:
        return data
    actual = hashlib.sha256(data).digest()
    if actual != op.dst_sha256:
        raise HashMismatchError("produced extent", op.dst_sha256.hex(), actual.hex(), op_index=index)
    return data
