"""The worst bundles the reader accepts, for the install memory bound.

Each bundle pushes one limit of docs/bundle-format.md to its maximum, with the
limits read from `bundler.format` (so the bundles follow the code when a limit
moves): REPLACE ops of `MAX_OP_DST` incompressible bytes whose zstd frame is
padded with empty blocks to exactly `MAX_OP_PAYLOAD`, frames whose window
descriptor is the largest the reader allows, the largest op count made of
one-byte ZERO ops plus one maximal REPLACE op, and a manifest padded with
whitespace to `MAX_MANIFEST` under the largest signature block. All of them are
genuinely signed with a test key: they get past every check and are installed.

zstd frames are written here byte by byte (RFC 8878: frame header, raw blocks,
empty raw blocks as padding), so the frame parameters are exactly what a hostile
but trusted build host could choose, not what libzstd happens to pick.

Also a peak-RSS measurement of a command in a fresh process: a small helper
interpreter forks and execs the command and reads RUSAGE_CHILDREN, so the
measuring process's own memory (pytest's) does not leak into the number
(Linux carries the forking process's high-water mark across exec).
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.format import header as header_mod
from bundler.format import ops as ops_mod
from bundler.format.header import Header
from bundler.format.manifest import ImageEntry, Manifest
from bundler.format.ops import Op, OpType, pack_table
from bundler.format.signing import MAX_SIGNATURES, pack_signatures, sign, signature_block_length

MiB = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_BLOCK_MAX = 128 << 10
RAW_BLOCK = 0
COMPATIBLE = "worst-case-board"


# --- zstd frames by hand ----------------------------------------------------


def window_size(window_log: int, mantissa: int = 0) -> int:
    base = 1 << window_log
    return base + (base >> 3) * mantissa


def _block_header(size: int, *, last: bool) -> bytes:
    return (int(last) | RAW_BLOCK << 1 | size << 3).to_bytes(3, "little")


def raw_frame(data: bytes, *, window_log: int, content_size: bool, length: int | None = None) -> bytes:
    """One zstd frame holding `data` in raw blocks under an explicit window
    descriptor of 2**window_log bytes (not single-segment), with or without an
    8-byte content size, padded to exactly `length` bytes with empty raw blocks
    and a zero (= no dictionary) Dictionary_ID field of 0-2 bytes."""
    block = min(ZSTD_BLOCK_MAX, window_size(window_log))
    pieces = [data[i : i + block] for i in range(0, len(data), block)] or [b""]
    bare = 4 + 2 + (8 if content_size else 0) + 3 * len(pieces) + len(data)
    did = padding = 0
    if length is not None:
        if length < bare:
            raise ValueError(f"a frame of {len(data)} bytes needs at least {bare} bytes, not {length}")
        did = (length - bare) % 3
        padding = (length - bare - did) // 3
    fhd = (0b11 << 6 if content_size else 0) | did  # FCS field 8 bytes / none; no checksum
    head = ZSTD_MAGIC + bytes([fhd, (window_log - 10) << 3]) + bytes(did)
    if content_size:
        head += struct.pack("<Q", len(data))
    body = b"".join(_block_header(len(p), last=False) + p for p in pieces[:-1])
    body += _block_header(0, last=False) * padding
    return head + body + _block_header(len(pieces[-1]), last=True) + pieces[-1]


# --- bundles ----------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The format limits a worst bundle is built against (default: the code's)."""

    max_op_dst: int = ops_mod.MAX_OP_DST
    max_op_payload: int = ops_mod.MAX_OP_PAYLOAD
    max_window: int = ops_mod.MAX_WINDOW
    max_ops: int = header_mod.MAX_OPS
    max_manifest: int = header_mod.MAX_MANIFEST
    content_size_required: bool = True  # False: frames without one (format version 1 before the bound was tightened)

    @property
    def window_log(self) -> int:
        return self.max_window.bit_length() - 1


@dataclass(frozen=True)
class Extent:
    """One op of a worst bundle: ZERO of `length` bytes, or REPLACE of `length`
    seeded random bytes (its frame padded to the largest payload unless `pad` is off)."""

    kind: OpType
    length: int
    seed: int = 0
    pad: bool = True


@dataclass(frozen=True)
class WorstBundle:
    name: str
    path: Path
    image_size: int
    image_sha256: str
    op_count: int


def _frame_for(data: bytes, limits: Limits, *, window_log: int, pad: bool) -> bytes:
    # Without a declared size a streaming decoder must buffer a window: worse, so
    # leave it out wherever the reader does not require it.
    content = limits.content_size_required
    return raw_frame(data, window_log=window_log, content_size=content, length=limits.max_op_payload if pad else None)


def build(
    name: str,
    out_dir: Path,
    extents: Sequence[Extent],
    keys: Sequence[Ed25519PrivateKey],
    *,
    limits: Limits,
    window_log: int | None = None,
    manifest_length: int | None = None,
) -> WorstBundle:
    """Write a signed bundle of one image made of `extents` (payload spooled to a
    temporary file, so building needs one extent in memory at a time)."""
    wlog = window_log if window_log is not None else max(limits.window_log, 10)
    ops: list[Op] = []
    image_hash = hashlib.sha256()
    dst = payload = 0
    with tempfile.TemporaryFile(dir=out_dir) as spool:
        for extent in extents:
            if extent.kind is OpType.ZERO:
                ops.append(Op(OpType.ZERO, dst, extent.length))
                image_hash.update(bytes(extent.length))
            else:
                data = random.Random(extent.seed).randbytes(extent.length)
                frame = _frame_for(data, limits, window_log=wlog, pad=extent.pad)
                spool.write(frame)
                digest, frame_digest = hashlib.sha256(data).digest(), hashlib.sha256(frame).digest()
                ops.append(Op(OpType.REPLACE, dst, extent.length, payload, len(frame), frame_digest, digest))
                image_hash.update(data)
                payload += len(frame)
            dst += extent.length
        manifest = Manifest(
            bundle_version="9.9.9",
            security_version=1,
            compatible=COMPATIBLE,
            created=datetime(2026, 1, 1, tzinfo=UTC),
            expires=None,
            images=(ImageEntry("rootfs", dst, image_hash.hexdigest(), 0, len(ops)),),
            op_count=len(ops),
            op_table_sha256=hashlib.sha256(pack_table(ops)).hexdigest(),
            payload_length=payload,
        )
        manifest_bytes = manifest.encode()
        if manifest_length is not None:  # whitespace is legal JSON; the signature covers it
            manifest_bytes = manifest_bytes[:-1] + b" " * (manifest_length - len(manifest_bytes)) + b"}"
        header = Header(len(manifest_bytes), signature_block_length(len(keys)), len(ops), payload)
        header_bytes = header.pack()
        path = out_dir / f"{name}.otab"
        with path.open("wb") as f:
            f.write(header_bytes + manifest_bytes)
            f.write(pack_signatures(sign(keys, header_bytes, manifest_bytes)))
            f.write(pack_table(ops))
            spool.seek(0)
            while chunk := spool.read(MiB):
                f.write(chunk)
    return WorstBundle(name, path, dst, image_hash.hexdigest(), len(ops))


def worst_bundles(
    out_dir: Path, trusted: Ed25519PrivateKey, *, limits: Limits | None = None, replace_ops: int = 4
) -> dict[str, Callable[[], WorstBundle]]:
    """Builders of the worst legal bundles, by name (each built when called)."""
    lim = limits or Limits()
    one = [trusted]
    maximal = [Extent(OpType.REPLACE, lim.max_op_dst, seed) for seed in range(replace_ops)]
    zeros = [Extent(OpType.ZERO, 1)] * (lim.max_ops - 1)
    # Maximal REPLACE ops with a ZERO op just short of a whole extent between them
    # (written from a partial copy of a zero buffer), after the largest number of
    # one-byte REPLACE ops (each a record with both hashes, a frame and a decode).
    mixed = [op for m in maximal for op in (m, Extent(OpType.ZERO, lim.max_op_dst - 1))]
    tiny = [Extent(OpType.REPLACE, 1, seed, pad=False) for seed in range(lim.max_ops - len(mixed))]
    # Untrusted signatures first: the reader scans them all before the trusted one.
    many_keys = [*(Ed25519PrivateKey.generate() for _ in range(MAX_SIGNATURES - 1)), trusted]
    return {
        "max-replace-ops": lambda: build("max-replace-ops", out_dir, maximal, one, limits=lim),
        "max-op-count": lambda: build(
            "max-op-count", out_dir, [*zeros, Extent(OpType.REPLACE, lim.max_op_dst, 7)], one, limits=lim
        ),
        "everything-at-once": lambda: build(
            "everything-at-once", out_dir, [*tiny, *mixed], many_keys, limits=lim, manifest_length=lim.max_manifest
        ),
    }


# --- measuring ----------------------------------------------------------------

# Runs in a fresh, small interpreter: fork, exec the command, wait, print the
# exit status and RUSAGE_CHILDREN's peak RSS (KiB). Output goes to the log file.
_HELPER = r"""
import os, resource, sys
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
pid = os.fork()
if pid == 0:
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@dataclass(frozen=True)
class Measured:
    rc: int
    peak_rss_kib: int
    output: str

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / 1024


def measure(argv: Sequence[str], log: Path) -> Measured:
    """Run argv (argv[0] an executable path) in a fresh process; its exit code and peak RSS."""
    log.write_text("")
    helper = [sys.executable, "-I", "-S", "-c", _HELPER, str(log), *argv]
    out = subprocess.run(helper, check=True, capture_output=True, text=True, timeout=600).stdout.split()
    return Measured(int(out[0]), int(out[1]), log.read_text(errors="replace"))


def helper_floor(log: Path) -> Measured:
    """The measurement's floor: the helper's own resident size carried into the child."""
    return measure(["/bin/true"], log)


def device_config(directory: Path) -> Path:
    return directory / "agent.toml"


def describe(bundle: WorstBundle) -> str:
    return json.dumps({"name": bundle.name, "ops": bundle.op_count, "image": bundle.image_size})
