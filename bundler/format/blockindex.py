"""The block index: a short hash of every 4 KiB block of a bundle's REPLACE
extents, so a device can find, anywhere in the data it already holds, the
blocks an op would produce (adaptive download, docs/bundle-format.md section 7.2).

Owns the region's layout (one HASH_LENGTH-byte entry per block, REPLACE ops in
table order), the block hash both sides compute, and the structural check of
the region against the op table. The region is the last part of the payload;
the manifest pins its offset, length and SHA-256. Entries are hints only:
nothing is written on the strength of one (the op's `dst_sha256` decides).
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterable, Sequence

from bundler.format.errors import BoundsError, FormatError
from bundler.format.ops import Op, OpType

BLOCK = 4096
HASH_LENGTH = 8
Buffer = bytes | bytearray | memoryview | mmap.mmap
MAX_INDEX_BLOCKS = 1 << 20  # 4 GiB of REPLACE extents: an 8 MiB region (the device's memory, section 9.1)


def block_hash(block: Buffer) -> bytes:
    """The index entry of one block (a partial last block is hashed as it is)."""
    return hashlib.sha256(block).digest()[:HASH_LENGTH]


def op_blocks(op: Op) -> int:
    """Entries one op has in the index: one per (started) 4 KiB block of a REPLACE op."""
    return -(-op.dst_length // BLOCK) if op.type is OpType.REPLACE else 0


def index_blocks(ops: Iterable[Op]) -> int:
    return sum(op_blocks(op) for op in ops)


def entries(image: Buffer, op: Op) -> bytes:
    """The index entries of one REPLACE op whose extent is at op.dst_offset of `image`."""
    end = op.dst_offset + op.dst_length
    return b"".join(block_hash(image[at : min(at + BLOCK, end)]) for at in range(op.dst_offset, end, BLOCK))


def check_index(ops: Sequence[Op], offset: int, length: int, payload_cursor: int, payload_length: int) -> int:
    """Check a manifest's block index against the (structurally valid) op table:
    it starts where the op payloads end, ends where the payload ends, and holds
    exactly one entry per block of every REPLACE op. Returns the block count."""
    if offset != payload_cursor:
        raise FormatError(f"block index at payload offset {offset}; the op payloads end at {payload_cursor}",
                          region="manifest")
    if offset + length != payload_length:
        raise FormatError(f"block index ends at payload offset {offset + length}, the payload at {payload_length}",
                          region="manifest")
    blocks = index_blocks(ops)
    if blocks == 0:
        raise FormatError("a block index in a bundle without REPLACE ops", region="manifest")
    if blocks > MAX_INDEX_BLOCKS:
        raise BoundsError("block index blocks", blocks, 1, MAX_INDEX_BLOCKS, region="manifest")
    if length != blocks * HASH_LENGTH:
        raise FormatError(f"block index is {length} bytes; the REPLACE ops have {blocks} blocks of "
                          f"{HASH_LENGTH}-byte entries ({blocks * HASH_LENGTH} bytes)", region="manifest")
    return blocks
