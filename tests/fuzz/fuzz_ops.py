"""Fuzz the op table and the extent producer directly: unpack_table and
validate_image_ops on arbitrary records (image size from the first 8 bytes),
and ops.produce on an arbitrary payload for a REPLACE op whose dst_length
comes from the input (frame header checks, zstd decoding, the extent hash)."""

from __future__ import annotations

import hashlib

from bundler.format.ops import MAX_OP_DST, Op, OpType, produce, unpack_table, validate_image_ops
from tests.fuzz._harness import main


def one_input(data: bytes) -> None:
    if len(data) < 11:
        return
    selector, size_bytes, rest = data[0], data[1:9], data[9:]
    if selector & 1:
        table = unpack_table(rest[: len(rest) - len(rest) % 128])
        validate_image_ops(table, 0, int.from_bytes(size_bytes, "little"), 0)
        return
    dst_length = 1 + int.from_bytes(size_bytes[:3], "little") % MAX_OP_DST
    op = Op(OpType.REPLACE, 0, dst_length, 0, len(rest), hashlib.sha256(rest).digest(), bytes(32))
    produce(op, rest, 0)


if __name__ == "__main__":
    main(one_input)
