"""A generator of crafted hostile bundles, each with the error it must be
rejected with: truncated at every structure boundary; a bit flipped in every
header field and in every region; every header length at 0, 2^31, 2^32 (or
the field's maximum, 2^32-1) and 2^63; trailing data; and bundles genuinely
signed by the trusted key whose contents lie (a decompression bomb,
overlapping, out-of-range, reordered and gapped extents, reserved bytes set,
an unknown op type, delta ops naming a base, payload hashes that lie), plus
one signed by an unknown key, one for another board and one expired.

`stage` says what the invariants require after the rejection: "head" cases are
refused before anything is written (both slots and the bootloader state byte
for byte as they were); "payload" cases are refused mid-stream, after the
target slot was marked bad (the booted slot and its boot state untouched).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ExpiredError, IncompatibleError, InstallError
from bundler.format.errors import BoundsError, FormatError, HashMismatchError, SignatureError, TruncatedError
from bundler.format.header import HEADER_SIZE, OP_RECORD_SIZE, Header
from bundler.format.manifest import ImageEntry
from bundler.format.ops import Op, OpType
from ota_common.errors import OtaError
from tests.unit.conftest import assemble, manifest_for

# Header layout "<8sHHIIIQ32s": (name, offset, struct format)
FIELDS = [("magic", 0, "8s"), ("format_version", 8, "H"), ("header_length", 10, "H"),
          ("manifest_length", 12, "I"), ("signature_length", 16, "I"), ("op_count", 20, "I"),
          ("payload_length", 24, "Q"), ("reserved", 32, "32s")]


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    error: type[OtaError]
    message: str  # a fragment of the one-line error
    stage: str = "head"


def _set(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, offset, value)
    return bytes(b)


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


def from_good(good: bytes, ops: list[Op]) -> list[Hostile]:
    """Hostile variants of a real bundle (`ops`: its op table, as read back)."""
    h = Header.unpack(good[:HEADER_SIZE])
    out: list[Hostile] = []
    # -- truncation at every structure boundary (and one byte either side) ----------------
    cuts = {"empty": 0, "one byte": 1, "inside the magic": 4, "inside the header": HEADER_SIZE - 1,
            "after the header": HEADER_SIZE, "inside the manifest": h.signature_offset - 1,
            "after the manifest": h.signature_offset, "inside the signature block": h.op_table_offset - 1,
            "after the signatures": h.op_table_offset, "inside op record 0": h.op_table_offset + OP_RECORD_SIZE // 2,
            "after the op table": h.payload_offset, "the last byte": len(good) - 1}
    pieces = [op for op in ops if op.payload_length]
    for n, op in enumerate(pieces):
        start = h.payload_offset + op.payload_offset
        cuts[f"inside payload piece {n}"] = start + op.payload_length // 2
        if n:
            cuts[f"at payload piece {n}"] = start
    for where, at in cuts.items():
        stage = "payload" if at >= h.payload_offset else "head"
        out.append(Hostile(f"truncated {where} ({at})", good[:at], TruncatedError, "truncated", stage))
    # -- a bit flipped in every header field ------------------------------------------------
    flip_errors: dict[str, tuple[type[OtaError], str]] = {
        "magic": (FormatError, "bad magic"), "format_version": (FormatError, "unsupported format version"),
        "header_length": (FormatError, "header length field"), "manifest_length": (FormatError, "signature"),
        "signature_length": (FormatError, "signature block is"), "op_count": (BoundsError, "op_count"),
        "payload_length": (SignatureError, "signature does not match"), "reserved": (FormatError, "reserved"),
    }
    for name, offset, fmt in FIELDS:
        flipped = _flip(good, offset + (struct.calcsize(fmt) - 1 if fmt == "32s" else 0))
        error, message = flip_errors[name]
        out.append(Hostile(f"bit flip in header {name}", flipped, error, message))
    # -- every length field at 0, 2^31, 2^32 (or the u32 maximum) and 2^63 -----------------
    for name, offset, fmt in FIELDS[3:7]:
        values = (0, 1 << 31, 1 << 32, 1 << 63) if fmt == "Q" else (0, 1 << 31, (1 << 32) - 1)
        for value in values:
            if name != "payload_length":
                error, message = BoundsError, f"{name}={value} outside"
            elif value < 1 << 63:  # in bounds: the signed header no longer matches
                error, message = SignatureError, "signature does not match"
            else:
                error, message = BoundsError, f"{name}={value} outside"
            out.append(Hostile(f"{name} = {value}", _set(good, offset, fmt, value), error, message))
    # -- a bit flipped in every region -----------------------------------------------------------
    for where, at, error in (
        ("manifest first byte", h.manifest_offset, SignatureError),
        ("manifest middle", h.manifest_offset + h.manifest_length // 2, SignatureError),
        ("manifest last byte", h.signature_offset - 1, SignatureError),
        ("signature block entry", h.signature_offset + 3, FormatError),
        ("signature bytes", h.op_table_offset - 1, SignatureError),
    ):
        out.append(Hostile(f"bit flip in {where}", _flip(good, at), error,
                           "reserved" if error is FormatError else "signature does not match"))
    for n in range(len(ops)):
        at = h.op_table_offset + n * OP_RECORD_SIZE + 9  # inside dst_offset
        out.append(Hostile(f"bit flip in op record {n}", _flip(good, at), HashMismatchError, "op table hash mismatch"))
    for n, op in enumerate(pieces):
        start = h.payload_offset + op.payload_offset
        for part, at in (("first", start), ("last", start + op.payload_length - 1)):
            out.append(Hostile(f"bit flip in payload piece {n} ({part} byte)", _flip(good, at), HashMismatchError,
                               "payload hash mismatch", "payload"))
    # -- trailing data ------------------------------------------------------------------------------
    for what, extra in (("1 byte", b"\0"), ("1 MiB", bytes(1 << 20)), ("a second bundle", good)):
        out.append(Hostile(f"trailing data: {what}", good + extra, FormatError,
                           "data after the end of the payload", "payload"))
    return out


def signed(key: Ed25519PrivateKey, other: Ed25519PrivateKey, compatible: str, security_version: int,
           base: bytes) -> list[Hostile]:
    """Bundles genuinely signed by the trusted key (or, once, by an unknown one) whose contents lie."""
    out: list[Hostile] = []

    def bundle(ops: list[Op], payload: bytes, *, size: int | None = None, signer: Ed25519PrivateKey = key,
               **fields: Any) -> bytes:
        fields.setdefault("compatible", compatible)
        fields.setdefault("security_version", security_version)
        m = manifest_for(ops, len(payload), size=size, **fields)
        return assemble(m, ops, payload, [signer])

    def replace(dst: int, content: bytes, poff: int, frame: bytes) -> Op:
        return Op(OpType.REPLACE, dst, len(content), poff, len(frame), hashlib.sha256(frame).digest(),
                  hashlib.sha256(content).digest())

    block = bytes(range(256)) * 16  # 4 KiB
    frame = zstandard.ZstdCompressor().compress(block)
    bomb_content = bytes(64 << 20)
    bomb = zstandard.ZstdCompressor().compress(bomb_content)
    one = replace(0, block, 0, frame)
    out.append(Hostile("decompression bomb (64 MiB frame for a 4 KiB extent)",
                       bundle([Op(OpType.REPLACE, 0, 4096, 0, len(bomb), hashlib.sha256(bomb).digest(),
                                  hashlib.sha256(block).digest())], bomb),
                       FormatError, "zstd frame declares 67108864 bytes", "payload"))
    out.append(Hostile("overlapping extents", bundle([one, replace(2048, block, 0, frame)], frame, size=6144),
                       FormatError, "destination offset"))
    out.append(Hostile("reordered extents", bundle([replace(4096, block, 0, frame), replace(0, block, 0, frame)],
                                                   frame, size=8192), FormatError, "destination offset"))
    out.append(Hostile("extent beyond the image", bundle([one, Op(OpType.ZERO, 4096, 1 << 40)], frame, size=8192),
                       FormatError, ""))
    out.append(Hostile("extents short of the image", bundle([one], frame, size=8192), FormatError, "cover"))
    out.append(Hostile("payload offset beyond the payload",
                       bundle([replace(0, block, 1 << 33, frame)], frame), FormatError, "payload offset"))
    out.append(Hostile("gap in the payload", bundle([one, replace(4096, block, len(frame) + 1, frame)],
                                                    frame + b"\0" + frame), FormatError, "payload offset"))
    lying = Op(OpType.REPLACE, 0, 4096, 0, len(frame), hashlib.sha256(b"lie").digest(),
               hashlib.sha256(block).digest())
    out.append(Hostile("payload hash lies", bundle([lying], frame), HashMismatchError,
                       "payload hash mismatch", "payload"))
    lying_dst = Op(OpType.REPLACE, 0, 4096, 0, len(frame), hashlib.sha256(frame).digest(),
                   hashlib.sha256(b"lie").digest())
    out.append(Hostile("extent hash lies", bundle([lying_dst], frame), HashMismatchError,
                       "extent hash mismatch", "payload"))
    out.append(Hostile("image hash lies", bundle([one], frame), HashMismatchError, "read-back", "payload"))
    # Deltas onto the booted slot's image (`base`): one against another base, one whose
    # source extent hash lies about what the base holds there, one without a base at all.
    base_entry: dict[str, Any] = {"base_sha256": hashlib.sha256(base).hexdigest(), "base_size": len(base)}
    lie = Op(OpType.SOURCE_COPY, 0, 4096, src_offset=0, src_length=4096, dst_sha256=hashlib.sha256(block).digest())
    out.append(Hostile("delta whose source extent hash lies",
                       bundle([lie], b"", images=(ImageEntry("rootfs", 4096, hashlib.sha256(block).hexdigest(), 0, 1,
                                                            **base_entry),)),
                       HashMismatchError, "base source extent at 0", "payload"))
    copy = Op(OpType.SOURCE_COPY, 0, 4096, src_offset=0, src_length=4096,
              dst_sha256=hashlib.sha256(base[:4096]).digest())
    wrong: dict[str, Any] = {"base_sha256": "cd" * 32, "base_size": len(base)}
    out.append(Hostile("delta against the wrong base",
                       bundle([copy], b"", images=(ImageEntry("rootfs", 4096, hashlib.sha256(base[:4096]).hexdigest(),
                                                             0, 1, **wrong),)),
                       InstallError, "nothing written"))
    out.append(Hostile("delta op in a full image (no base named)", bundle([copy], b""), FormatError, "SOURCE_COPY"))
    out.append(Hostile("signed by an unknown key", bundle([one], frame, signer=other), SignatureError,
                       "none of which is in the keyring"))
    out.append(Hostile("built for another board", bundle([one], frame, compatible="other-board"), IncompatibleError,
                       "other-board"))
    out.append(Hostile("expired", bundle([one], frame, expires=datetime(2001, 1, 1, tzinfo=UTC)), ExpiredError,
                       "expired"))
    out.append(Hostile("op type changed in a signed table", _op_type(bundle([one], frame), 9), HashMismatchError,
                       "op table hash mismatch"))
    return out


def _op_type(data: bytes, value: int) -> bytes:
    h = Header.unpack(data[:HEADER_SIZE])
    b = bytearray(data)
    b[h.op_table_offset] = value
    return bytes(b)

