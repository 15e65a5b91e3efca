"""Assembling a bundle file from a manifest, an op table and a payload file.

Owns the on-disk order of regions and the signing step; it does not decide
which ops an image needs (that is `bundler.build`).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.format.header import Header
from bundler.format.manifest import Manifest
from bundler.format.ops import Op, pack_table
from bundler.format.signing import pack_signatures, sign, signature_block_length


def op_table_digest(ops: Sequence[Op]) -> str:
    return hashlib.sha256(pack_table(ops)).hexdigest()


def write_bundle(
    out: BinaryIO, manifest: Manifest, ops: Sequence[Op], payload: BinaryIO, keys: Sequence[Ed25519PrivateKey]
) -> Header:
    """Write header, manifest, signatures, op table, then copy the payload."""
    if not keys:
        raise ValueError("at least one signing key is required")
    table = pack_table(ops)
    if hashlib.sha256(table).hexdigest() != manifest.op_table_sha256:
        raise ValueError("manifest does not pin this op table")
    manifest_bytes = manifest.encode()
    header = Header(
        manifest_length=len(manifest_bytes),
        signature_length=signature_block_length(len(keys)),
        op_count=len(ops),
        payload_length=manifest.payload_length,
    )
    header_bytes = header.pack()
    signatures = pack_signatures(sign(keys, header_bytes, manifest_bytes))
    out.write(header_bytes)
    out.write(manifest_bytes)
    out.write(signatures)
    out.write(table)
    shutil.copyfileobj(payload, out, 1 << 20)
    return header


def write_bundle_file(
    path: Path, manifest: Manifest, ops: Sequence[Op], payload_path: Path, keys: Sequence[Ed25519PrivateKey]
) -> Header:
    tmp = path.with_name(f".{path.name}.part")
    with tmp.open("wb") as out, payload_path.open("rb") as payload:
        header = write_bundle(out, manifest, ops, payload, keys)
    tmp.replace(path)
    return header
