"""Building a full bundle from an image file.

Owns the choice of ops for a full image: runs of all-zero 1 MiB segments
become ZERO ops (no payload), everything else REPLACE ops of up to 4 MiB, each
one zstd frame compressed on a pool of threads. The payload is spooled to a
temporary file beside the output because the header and op table, which come
first, pin hashes only known at the end; memory stays bounded by the number of
chunks in flight.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zstandard

from bundler.format.header import Header
from bundler.format.manifest import ImageEntry, Manifest
from bundler.format.ops import Op, OpType
from bundler.format.signing import load_private_key
from bundler.format.writer import op_table_digest, write_bundle_file

SEGMENT = 1 << 20
CHUNK = 4 << 20
DEFAULT_LEVEL = 10
_ZERO_SEGMENT = bytes(SEGMENT)

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class BundleSpec:
    image: Path
    key: Path
    version: str
    security_version: int
    compatible: str
    expires: datetime | None = None
    slot_class: str = "rootfs"
    level: int = DEFAULT_LEVEL
    threads: int = 0  # 0: one per CPU


@dataclass(frozen=True, slots=True)
class BuildResult:
    header: Header
    manifest: Manifest
    ops: int
    image_size: int
    bundle_size: int


_local = threading.local()


def _compress(data: bytes, level: int) -> tuple[bytes, bytes, bytes]:
    compressor = getattr(_local, "c", None)
    if compressor is None or _local.level != level:
        compressor = _local.c = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _local.level = level
    frame = compressor.compress(data)
    return frame, hashlib.sha256(frame).digest(), hashlib.sha256(data).digest()


def build_full(spec: BundleSpec, out: Path, progress: Progress | None = None) -> BuildResult:
    key = load_private_key(spec.key)
    size = spec.image.stat().st_size
    if size == 0:
        raise ValueError(f"{spec.image}: image is empty")
    threads = spec.threads or os.cpu_count() or 1
    ops: list[Op] = []
    image_hash = hashlib.sha256()
    payload_len = 0
    with (
        tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".payload") as spool,
        spec.image.open("rb") as image,
        ThreadPoolExecutor(max_workers=threads) as pool,
    ):
        pending: deque[tuple[int, int, Future[tuple[bytes, bytes, bytes]]]] = deque()

        def drain(limit: int) -> None:
            nonlocal payload_len
            while len(pending) > limit:
                offset, length, fut = pending.popleft()
                frame, frame_hash, dst_hash = fut.result()
                spool.write(frame)
                ops.append(Op(OpType.REPLACE, offset, length, payload_len, len(frame), frame_hash, dst_hash))
                payload_len += len(frame)

        def add_zero(offset: int, length: int) -> None:
            drain(0)  # keep ops in destination order
            last = ops[-1] if ops else None
            if last is not None and last.type is OpType.ZERO and last.dst_offset + last.dst_length == offset:
                ops[-1] = Op(OpType.ZERO, last.dst_offset, last.dst_length + length)
            else:
                ops.append(Op(OpType.ZERO, offset, length))

        chunk = bytearray()
        chunk_start = 0
        offset = 0

        def submit_chunk() -> None:
            nonlocal chunk
            pending.append((chunk_start, len(chunk), pool.submit(_compress, bytes(chunk), spec.level)))
            chunk = bytearray()

        while True:
            segment = image.read(SEGMENT)
            if not segment:
                break
            image_hash.update(segment)
            if segment == _ZERO_SEGMENT[: len(segment)]:
                if chunk:
                    submit_chunk()
                add_zero(offset, len(segment))
            else:
                if not chunk:
                    chunk_start = offset
                chunk += segment
                if len(chunk) >= CHUNK:
                    submit_chunk()
                    drain(2 * threads)
            offset += len(segment)
            if progress:
                progress(offset, size)
        if chunk:
            submit_chunk()
        drain(0)
        if offset != size:
            raise ValueError(f"{spec.image}: read {offset} bytes, expected {size} (file changed while reading?)")
        spool.flush()
        manifest = Manifest(
            bundle_version=spec.version,
            security_version=spec.security_version,
            compatible=spec.compatible,
            created=datetime.now(UTC).replace(microsecond=0),
            expires=spec.expires,
            images=(ImageEntry(spec.slot_class, size, image_hash.hexdigest(), 0, len(ops)),),
            op_count=len(ops),
            op_table_sha256=op_table_digest(ops),
            payload_length=payload_len,
        )
        header = write_bundle_file(out, manifest, ops, Path(spool.name), [key])
    return BuildResult(header, manifest, len(ops), size, header.total_length)
