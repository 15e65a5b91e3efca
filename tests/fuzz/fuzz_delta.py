"""Fuzz the device's op execution with a source (bundler.format.apply.run_op):
an arbitrary op record (the first 128 bytes) and payload (the rest), applied
against tests.fuzz.delta_pair's base and target read from files as the
installer reads slots. As in an install, the record has passed the op table's
checks (the op after a ZERO of everything before its destination) and the
payload is the op's whole payload, its hash pinned. DELTA payloads reach their dictionary extents (origins,
codecs, inflated and x86-filtered extents, their hashes), the zstd frame under
its window bound, and the pieces recompressed on the device (zlib, deflate,
GNU gzip block lists, x86), then the produced extent's hash."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace

from bundler.format.apply import FileSource, run_op
from bundler.format.header import OP_RECORD_SIZE
from bundler.format.ops import Op, OpType, validate_image_ops
from tests.fuzz._harness import main, scratch_dir
from tests.fuzz.delta_pair import pair


@functools.cache
def _source() -> tuple[FileSource, int]:
    base, target = pair()
    directory = scratch_dir()
    (directory / "base.img").write_bytes(base)
    (directory / "target.img").write_bytes(target)
    return FileSource(directory / "base.img", directory / "target.img"), len(base)


def one_input(data: bytes) -> None:
    if len(data) < OP_RECORD_SIZE:
        return
    op = Op.unpack(data[:OP_RECORD_SIZE], 0)
    payload = data[OP_RECORD_SIZE:]
    if op.type in (OpType.REPLACE, OpType.DELTA):
        op = replace(op, payload_offset=0, payload_length=len(payload), payload_sha256=hashlib.sha256(payload).digest())
    source, base_size = _source()
    before = [Op(OpType.ZERO, 0, op.dst_offset)] if op.dst_offset else []
    validate_image_ops([*before, op], 0, op.dst_offset + op.dst_length, 0, base_size)
    run_op(op, payload if op.type in (OpType.REPLACE, OpType.DELTA) else None, 0, source, base_size)


if __name__ == "__main__":
    main(one_input)
