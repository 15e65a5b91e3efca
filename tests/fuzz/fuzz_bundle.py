"""Fuzz the bundle reader end to end on raw bytes: header, manifest and
signature block (BundleReader.read_head + signing.verify), op table
(read_op_table), payload (iter_payload) and extents (apply.apply_op, with
no source: a delta's source reads are refused). Mutated
bytes rarely keep a valid signature, so fuzz_resigned.py and the per-region
harnesses go deeper; this one holds the order of checks on hostile input."""

from __future__ import annotations

import io

from bundler.format.apply import NoSource, apply_op
from bundler.format.reader import BundleReader
from bundler.format.signing import verify
from tests.fuzz._harness import TEST_KEYRING, main


def one_input(data: bytes) -> None:
    reader = BundleReader(io.BytesIO(data))
    bundle = verify(reader.read_head(), TEST_KEYRING)
    ops = reader.read_op_table(bundle)
    for index, op, payload in reader.iter_payload(ops):
        apply_op(op, payload, index, NoSource(), 1 << 20)


if __name__ == "__main__":
    main(one_input)
