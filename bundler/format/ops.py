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

from bundler.format.errors import BoundsError, FormatError, HashMismatchError
from bundler.format.header import OP_RECORD_SIZE

BLOCK_SIZE = 4096
MAX_OP_DST = 4 << 20  # produced bytes of one REPLACE/DELTA/SOURCE_COPY op: bounds install memory
# ZSTD_COMPRESSBOUND(MAX_OP_DST): no zstd encoder's one-shot frame of MAX_OP_DST bytes is larger.
MAX_OP_PAYLOAD = MAX_OP_DST + (MAX_OP_DST >> 8)
MAX_WINDOW = MAX_OP_DST  # a frame's window never needs to exceed the op it produces
MAX_DICT = 8 << 20  # dictionary bytes of one DELTA op (the sum of its extents)
MAX_DICT_EXTENTS = 64
MAX_DELTA_WINDOW = 16 << 20  # covers MAX_DICT + MAX_OP_DST, rounded up to a power of two
DELTA_EXTENT_SIZE = 56  # one dictionary extent record in a DELTA payload
# A DELTA payload: u32 extent count, the extent records, then one frame of at most MAX_OP_PAYLOAD.
MAX_DELTA_PAYLOAD = 4 + MAX_DICT_EXTENTS * DELTA_EXTENT_SIZE + MAX_OP_PAYLOAD
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
    origin: Origin
    offset: int
    length: int
    sha256: bytes

    def pack(self) -> bytes:
        return _EXTENT.pack(self.origin, bytes(7), self.offset, self.length, self.sha256)


_EXTENT = struct.Struct("<B7sQQ32s")
assert _EXTENT.size == DELTA_EXTENT_SIZE
_COUNT = struct.Struct("<I")


def pack_delta(extents: Sequence[DictExtent], frame: bytes) -> bytes:
    return _COUNT.pack(len(extents)) + b"".join(e.pack() for e in extents) + frame


def parse_delta(op: Op, payload: Buffer, index: int, base_size: int) -> tuple[tuple[DictExtent, ...], memoryview]:
    """The dictionary extents and the frame of a (hash-checked) DELTA payload.
    Every extent is checked before anything is read: 1 to MAX_DICT_EXTENTS of
    them, lengths summing to the op's src_length, base extents inside the base
    image, target extents wholly before the op's destination, no two of one
    origin overlapping."""
    view = memoryview(payload).cast("B")
    region = f"op {index}"
    if len(view) < _COUNT.size:
        raise FormatError(f"op {index}: DELTA payload has no extent count", region="payload")
    (count,) = _COUNT.unpack_from(view)
    if not 1 <= count <= MAX_DICT_EXTENTS:
        raise BoundsError("dictionary extents", count, 1, MAX_DICT_EXTENTS, region=region)
    start = _COUNT.size + count * DELTA_EXTENT_SIZE
    if len(view) <= start:
        raise FormatError(f"op {index}: DELTA payload ends inside its extent list", region="payload")
    extents: list[DictExtent] = []
    total = 0
    for k in range(count):
        kind, reserved, offset, length, digest = _EXTENT.unpack_from(view, _COUNT.size + k * DELTA_EXTENT_SIZE)
        if reserved != bytes(7) or kind not in {Origin.BASE, Origin.TARGET}:
            message = f"op {index}: dictionary extent {k} has an unknown origin or reserved bytes"
            raise FormatError(message, region="payload")
        origin = Origin(kind)
        limit = base_size if origin is Origin.BASE else op.dst_offset
        if not 1 <= length <= MAX_DICT or offset > limit or length > limit - offset:
            where = "the base image" if origin is Origin.BASE else "the target written before this op"
            raise BoundsError(
                f"dictionary extent {k} [{offset}, +{length})", offset + length, 1, limit,
                region=f"{region} (outside {where})",
            )
        total += length
        extents.append(DictExtent(origin, offset, length, digest))
    if total != op.src_length:
        message = f"op {index}: dictionary extents hold {total} bytes, op says {op.src_length}"
        raise FormatError(message, region="payload")
    for origin in Origin:
        spans = sorted((e.offset, e.offset + e.length) for e in extents if e.origin is origin)
        for (_, end), (next_start, _) in itertools.pairwise(spans):
            if next_start < end:
                message = f"op {index}: dictionary extents overlap at {origin.name} offset {next_start}"
                raise FormatError(message, region="payload")
    return tuple(extents), view[start:]


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
                if not 1 <= op.src_length <= MAX_DICT:
                    raise BoundsError("dictionary length", op.src_length, 1, MAX_DICT, region=f"op {i}")
            if op.payload_offset != payload_cursor:
                raise FormatError(
                    f"op {i}: payload offset {op.payload_offset}, expected {payload_cursor}", region="op table"
                )
            payload_cursor += op.payload_length
        dst += op.dst_length
    if dst != image_size:
        raise FormatError(f"ops cover {dst} bytes of a {image_size}-byte image", region="op table")
    return payload_cursor


def produce(op: Op, payload: Buffer, index: int, dictionary: Buffer | None = None) -> bytes:
    """The extent an op produces from its (already hash-checked) payload, checked
    against the op's pinned destination hash. Not for ZERO ops.

    The frame header is checked before anything is decoded: zstd magic, no
    dictionary, window <= MAX_WINDOW, and a declared content size equal to
    dst_length. With the size declared and the whole frame in memory, the decoder
    writes straight into one dst_length buffer and allocates no window of its own;
    the declared size is what it allocates, so it must match first.

    A DELTA's frame (`payload` is then the frame after the extent list) is
    decoded with `dictionary`, the concatenation of its checked extents, as raw
    content; its window may reach MAX_DELTA_WINDOW (dictionary plus extent)."""
    if op.type is OpType.REPLACE:
        if dictionary is not None:
            raise FormatError(f"op {index}: a REPLACE op has no dictionary", region="op table")
        window = MAX_WINDOW
    elif op.type is OpType.DELTA:
        if dictionary is None:
            raise FormatError(f"op {index}: a DELTA op needs its dictionary", region="op table")
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
    if params.content_size != op.dst_length:
        raise FormatError(
            f"op {index}: zstd frame declares {params.content_size} bytes, op has {op.dst_length}", region="payload"
        )
    try:
        if dictionary is None:
            decoder = zstandard.ZstdDecompressor(max_window_size=window)
        else:
            raw = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            decoder = zstandard.ZstdDecompressor(dict_data=raw, max_window_size=window)
        data: bytes = decoder.decompress(payload, max_output_size=op.dst_length, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise FormatError(f"op {index}: zstd frame does not decode: {e}", region="payload") from None
    if len(data) != op.dst_length:
        raise FormatError(f"op {index}: decoded {len(data)} bytes, expected {op.dst_length}", region="payload")
    actual = hashlib.sha256(data).digest()
    if actual != op.dst_sha256:
        raise HashMismatchError("produced extent", op.dst_sha256.hex(), actual.hex(), op_index=index)
    return data
