"""Operation records: what each extent of the target image is made of.

Owns the fixed 128-byte record layout, structural validation of an op table
against the manifest (destination coverage, payload contiguity, size bounds),
and turning one op plus its verified payload into the bytes of its extent.
It does not read streams or write slots.

Op types: ZERO (no payload), REPLACE (one zstd frame), SOURCE_COPY and DELTA
(reserved for delta bundles: the record already carries a source extent).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

from bundler.format.errors import BoundsError, FormatError, HashMismatchError
from bundler.format.header import OP_RECORD_SIZE

BLOCK_SIZE = 4096
MAX_OP_DST = 8 << 20  # produced bytes of one REPLACE/DELTA/SOURCE_COPY op: bounds install memory
MAX_OP_PAYLOAD = MAX_OP_DST + (1 << 20)  # a zstd frame of incompressible data is slightly larger
MAX_WINDOW = 1 << 27  # refuse zstd frames that would need a larger decoder window

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
    def unpack(cls, raw: bytes, index: int) -> Op:
        (kind, res1, dst_off, dst_len, src_off, src_len, p_off, p_len, p_hash, d_hash, res2) = _STRUCT.unpack(raw)
        if res1 != bytes(7) or res2 != bytes(8):
            raise FormatError(f"op {index}: reserved bytes are not zero", region="op table")
        try:
            op_type = OpType(kind)
        except ValueError:
            raise FormatError(f"op {index}: unknown op type {kind}", region="op table") from None
        return cls(op_type, dst_off, dst_len, p_off, p_len, p_hash, d_hash, src_off, src_len)


def pack_table(ops: Sequence[Op]) -> bytes:
    return b"".join(op.pack() for op in ops)


def unpack_table(raw: bytes) -> list[Op]:
    if len(raw) % OP_RECORD_SIZE:
        raise FormatError(f"op table length {len(raw)} is not a multiple of {OP_RECORD_SIZE}", region="op table")
    return [Op.unpack(raw[i : i + OP_RECORD_SIZE], i // OP_RECORD_SIZE) for i in range(0, len(raw), OP_RECORD_SIZE)]


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


def produce(op: Op, payload: bytes, index: int) -> bytes:
    """The extent an op produces from its (already hash-checked) payload, checked
    against the op's pinned destination hash. Not for ZERO ops."""
    if op.type is not OpType.REPLACE:
        raise FormatError(f"op {index}: cannot produce {op.type.name} here", region="op table")
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise FormatError(f"op {index}: payload is not a zstd frame: {e}", region="payload") from e
    if params.window_size > MAX_WINDOW:
        raise BoundsError("zstd window", params.window_size, 0, MAX_WINDOW, region=f"op {index}")
    # A declared content size makes the decoder allocate that much whatever
    # max_output_size says, so it must be checked before decompressing.
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, op.dst_length):
        raise FormatError(
            f"op {index}: zstd frame declares {params.content_size} bytes, op has {op.dst_length}", region="payload"
        )
    try:
        data: bytes = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompress(
            payload, max_output_size=op.dst_length, allow_extra_data=False
        )
    except zstandard.ZstdError as e:
        raise FormatError(f"op {index}: zstd frame does not decode: {e}", region="payload") from e
    if len(data) != op.dst_length:
        raise FormatError(f"op {index}: decoded {len(data)} bytes, expected {op.dst_length}", region="payload")
    actual = hashlib.sha256(data).digest()
    if actual != op.dst_sha256:
        raise HashMismatchError("produced extent", op.dst_sha256.hex(), actual.hex(), op_index=index)
    return data
