"""The fixed 64-byte bundle header: magic, format version and the region lengths.

Owns packing/unpacking and the bounds every length must satisfy before the
reader allocates or reads anything. It does not own what the regions contain.
All integers are little-endian; offsets and payload lengths are 64-bit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bundler.format.errors import BoundsError, FormatError

MAGIC = b"\x89OTAB\r\n\x1a"
FORMAT_VERSION = 1
HEADER_SIZE = 64
OP_RECORD_SIZE = 128

MAX_MANIFEST = 64 << 10  # 64 KiB: a canonical manifest of 16 images is under 8 KiB
MAX_SIGNATURE_BLOCK = 2 + 16 * 100  # u16 count + at most 16 entries of 100 bytes
MAX_OP_TABLE = 4 << 20  # 4 MiB: 32768 ops, e.g. 128 GiB of 4 MiB REPLACE ops; held during install
MAX_OPS = MAX_OP_TABLE // OP_RECORD_SIZE
# Ops of a bundle holding a delta image (its table is held while DELTA ops hold their
# dictionaries; at MAX_OPS records the worst delta bundle peaked at 66.8 MiB RSS): section 9.1.
MAX_DELTA_OPS = 8192
MAX_PAYLOAD = (1 << 63) - 1

_STRUCT = struct.Struct("<8sHHIIIQ32s")
assert _STRUCT.size == HEADER_SIZE


@dataclass(frozen=True, slots=True)
class Header:
    manifest_length: int
    signature_length: int
    op_count: int
    payload_length: int
    format_version: int = FORMAT_VERSION

    @property
    def manifest_offset(self) -> int:
        return HEADER_SIZE

    @property
    def signature_offset(self) -> int:
        return HEADER_SIZE + self.manifest_length

    @property
    def op_table_offset(self) -> int:
        return self.signature_offset + self.signature_length

    @property
    def op_table_length(self) -> int:
        return self.op_count * OP_RECORD_SIZE

    @property
    def payload_offset(self) -> int:
        return self.op_table_offset + self.op_table_length

    @property
    def total_length(self) -> int:
        return self.payload_offset + self.payload_length

    def pack(self) -> bytes:
        self.check()
        return _STRUCT.pack(
            MAGIC,
            self.format_version,
            HEADER_SIZE,
            self.manifest_length,
            self.signature_length,
            self.op_count,
            self.payload_length,
            bytes(32),
        )

    def check(self) -> None:
        _bound("manifest_length", self.manifest_length, 2, MAX_MANIFEST)
        _bound("signature_length", self.signature_length, 2, MAX_SIGNATURE_BLOCK)
        _bound("op_count", self.op_count, 1, MAX_OPS)
        _bound("payload_length", self.payload_length, 0, MAX_PAYLOAD)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) != HEADER_SIZE:
            raise FormatError(f"header must be {HEADER_SIZE} bytes, got {len(raw)}", region="header")
        magic, version, hsize, mlen, slen, nops, plen, reserved = _STRUCT.unpack(raw)
        if magic != MAGIC:
            raise FormatError("not an edge-ota bundle (bad magic)", region="header")
        if version != FORMAT_VERSION:
            raise FormatError(
                f"unsupported format version {version} (this reader supports {FORMAT_VERSION})", region="header"
            )
        if hsize != HEADER_SIZE:
            raise FormatError(f"header length field is {hsize}, expected {HEADER_SIZE}", region="header")
        if reserved != bytes(32):
            raise FormatError("reserved header bytes are not zero", region="header")
        header = cls(mlen, slen, nops, plen, version)
        header.check()
        return header


def _bound(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise BoundsError(name, value, low, high, region="header")
