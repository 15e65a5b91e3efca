"""Fuzz the reader past the signature: the mutated bundle's hashes are
repaired and it is re-signed with the fuzz test key before it is read, so
mutations of the manifest, the op table and the payload reach manifest
parsing, op table structure checks and zstd decoding as a trusted signer's
bundle would. Repairs, each only where the bytes allow it: manifest_length
fitted to the manifest, op_table.sha256 and every REPLACE op's payload_sha256
recomputed, the signature block replaced by one valid signature."""

from __future__ import annotations

import hashlib
import json
import struct

from bundler.format.header import HEADER_SIZE, OP_RECORD_SIZE
from bundler.format.signing import pack_signatures, sign
from tests.fuzz import fuzz_bundle
from tests.fuzz._harness import TEST_KEY, main

_LENGTHS = struct.Struct("<III")  # manifest_length, signature_length, op_count at offset 12
_SIGNATURE_BLOCK = 102


def resign(data: bytes) -> bytes:
    """Repair the hashes and the signature of a (mutated) bundle, as far as its layout allows."""
    if len(data) < HEADER_SIZE:
        return data
    header = bytearray(data[:HEADER_SIZE])
    manifest_length, signature_length, op_count = _LENGTHS.unpack_from(header, 12)
    manifest = data[HEADER_SIZE : HEADER_SIZE + manifest_length]
    rest = data[HEADER_SIZE + manifest_length + signature_length :]
    table, payload = rest[: op_count * OP_RECORD_SIZE], rest[op_count * OP_RECORD_SIZE :]
    table = _repair_payload_hashes(table, payload)
    try:
        doc = json.loads(manifest)
        doc["op_table"]["sha256"] = hashlib.sha256(table).hexdigest()
        manifest = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        pass  # not a manifest that can be repaired: sign it as it is
    _LENGTHS.pack_into(header, 12, len(manifest), _SIGNATURE_BLOCK, op_count)
    signatures = pack_signatures(sign([TEST_KEY], bytes(header), manifest))
    return bytes(header) + manifest + signatures + table + payload


def _repair_payload_hashes(table: bytes, payload: bytes) -> bytes:
    out = bytearray(table)
    for start in range(0, len(out) - OP_RECORD_SIZE + 1, OP_RECORD_SIZE):
        if out[start] != 1:  # REPLACE
            continue
        p_off, p_len = struct.unpack_from("<QQ", out, start + 40)
        if p_len and p_off + p_len <= len(payload):
            out[start + 56 : start + 88] = hashlib.sha256(payload[p_off : p_off + p_len]).digest()
    return bytes(out)


def one_input(data: bytes) -> None:
    fuzz_bundle.one_input(resign(data))


if __name__ == "__main__":
    main(one_input)
