"""Operation records: what each extent of the target image is made of.

Owns the fixed 128-byte record layout, structural validation of an op table
against the manifest (destination coverage, payload contiguity, size bounds),
and turning one op plus its verified payload into the bytes of its extent.
It does not read streams or write slots.

`OpTable` keeps a table as its raw records and unpacks one `Op` at a time:
32,768 ops are 4 MiB of records but ~13 MiB as Python objects, which the
install memory bound (docs/bundle-format.md section 9.1) cannot afford.

Op types: ZERO (no payload), REPLACE (one zstd frame), SOURCE_COPY and DELTA
(reserved for delta bundles: the record already carries a source extent).
"""

from __future__ import annotations

import enum
import hashlib
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


SUPPORTED = frozenset({OpType.ZERO, OpType.REPLACE})


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


def validate_image_ops(ops: Sequence[Op], first_index: int, image_size: int, payload_cursor: int) -> int:
    """Check one image's ops: contiguous destination coverage of [0, size) in order,
    payload pieces contiguous in the same order, every length within bounds.
    Returns the payload cursor after this image."""
    dst = 0
    for i, op in enumerate(ops, start=first_index):
        if op.type not in SUPPORTED:
            raise FormatError(f"op {i}: {op.type.name} is not supported by this reader", region="op table")
        if op.dst_offset != dst:
            raise FormatError(f"op {i}: destination offset {op.dst_offset}, expected {dst}", region="op table")
        if op.dst_length <= 0 or op.dst_offset + op.dst_length > image_size:
            raise BoundsError("dst_length", op.dst_length, 1, image_size - op.dst_offset, region=f"op {i}")
        if op.type is OpType.ZERO:
            if op.payload_length != 0 or op.payload_sha256 != NO_HASH:
                raise FormatError(f"op {i}: ZERO op carries payload", region="op table")
        else:
            if op.dst_length > MAX_OP_DST:
                raise BoundsError("dst_length", op.dst_length, 1, MAX_OP_DST, region=f"op {i}")
            if not 1 <= op.payload_length <= MAX_OP_PAYLOAD:
                raise BoundsError("payload_length", op.payload_length, 1, MAX_OP_PAYLOAD, region=f"op {i}")
            if op.payload_offset != payload_cursor:
                raise FormatError(
                    f"op {i}: payload offset {op.payload_offset}, expected {payload_cursor}", region="op table"
                )
            payload_cursor += op.payload_length
        dst += op.dst_length
    if dst != image_size:
        raise FormatError(f"ops cover {dst} bytes of a {image_size}-byte image", region="op table")
    return payload_cursor


def produce(op: Op, payload: Buffer, index: int) -> bytes:
    """The extent an op produces from its (already hash-checked) payload, checked
    against the op's pinned destination hash. Not for ZERO ops.

    The frame header is checked before anything is decoded: zstd magic, no
    dictionary, window <= MAX_WINDOW, and a declared content size equal to
    dst_length. With the size declared and the whole frame in memory, the decoder
    writes straight into one dst_length buffer and allocates no window of its own;
    the declared size is what it allocates, so it must match first."""
    if op.type is not OpType.REPLACE:
        raise FormatError(f"op {index}: cannot produce {op.type.name} here", region="op table")
    if bytes(memoryview(payload)[:4]) != ZSTD_MAGIC:
        raise FormatError(f"op {index}: payload is not a zstd frame (bad magic number)", region="payload")
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise FormatError(f"op {index}: payload is not a zstd frame: {e}", region="payload") from None
    if params.dict_id:
        raise FormatError(f"op {index}: zstd frame needs dictionary {params.dict_id}", region="payload")
    if params.window_size > MAX_WINDOW:
        raise BoundsError("zstd window", params.window_size, 0, MAX_WINDOW, region=f"op {index}")
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise FormatError(f"op {index}: zstd frame does not declare its content size", region="payload")
    if params.content_size != op.dst_length:
        raise FormatError(
            f"op {index}: zstd frame declares {params.content_size} bytes, op has {op.dst_length}", region="payload"
        )
    try:
        data: bytes = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompress(
            payload, max_output_size=op.dst_length, allow_extra_data=False
        )
    except zstandard.ZstdError as e:
        raise FormatError(f"op {index}: zstd frame does not decode: {e}", region="payload") from None
    if len(data) != op.dst_length:
        raise FormatError(f"op {index}: decoded {len(data)} bytes, expected {op.dst_length}", region="payload")
    actual = hashlib.sha256(data).digest()
    if actual != op.dst_sha256:
        raise HashMismatchError("produced extent", op.dst_sha256.hex(), actual.hex(), op_index=index)
    return data
