"""Building a full bundle from one or more image files.

Owns two things (`bundler.spec` checks the `BundleSpec` first, with the
reader's own rules):
- running the build: each image is planned (`bundler.planner`: a full image,
  or a delta against its class's base image) and the plan executed
  (`bundler.executor`: compression on a pool of threads). Several images (one
  per slot class) follow each other in the op table and payload, each a
  contiguous range;
- the build's temporary data: the payload is spooled to an anonymous file
  beside the output (the header and op table, which come first, pin hashes only
  known at the end). A full image is mapped, and memory stays bounded by the
  ops in flight; a delta build holds both images in memory (the similarity
  search scans them).
  The finished file is read back by the reader before it replaces the output.

A full image may also carry **embedded deltas** (`--delta-from OLD`,
docs/bundle-format.md section 7.3): each is planned and executed exactly as a
`--base` delta, into a spool of its own, and appended after the op payloads
and the block index as its op table followed by its payload pieces, pinned by
the manifest. Devices installing the bundle adaptively from a server that run
OLD fetch only that delta; every other reader installs the full image.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from bundler.executor import Inputs, execute
from bundler.format import blockindex
from bundler.format import embedded as embedded_mod
from bundler.format.header import MAX_DELTA_OPS, MAX_OPS, Header
from bundler.format.manifest import (
    BlockIndexRef,
    EmbeddedDeltaRef,
    ImageEntry,
    Manifest,
)
from bundler.format.ops import Op, OpType, pack_table
from bundler.format.reader import BundleReader
from bundler.format.signing import Keyring, key_id, verify
from bundler.format.writer import op_table_digest, write_bundle_file
from bundler.planner import CHUNK, SEGMENT, plan_delta, plan_full
from bundler.spec import DEFAULT_CHUNK, BuildError, BundleSpec, ImageSource, OptionError, check
from ota_common.errors import OtaError

# The build's inputs and errors, defined with the checks (bundler.spec), are this module's API too.
__all__ = ["DEFAULT_CHUNK", "BuildError", "BuildResult", "BundleSpec", "ImageSource", "OptionError", "build_full"]

DELTA_IN_FLIGHT = 32

Progress = Callable[[int, int], None]
Warn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BuildResult:
    header: Header
    manifest: Manifest
    ops: int
    image_size: int  # all images together
    bundle_size: int
    signers: tuple[bytes, ...] = ()  # key ids, in signature block order
    warnings: tuple[str, ...] = ()


class _Payload:
    """The payload spool, an anonymous temporary file beside the output: it has
    no name to leave behind or to show in an error. Write errors name the output."""

    def __init__(self, out: Path) -> None:
        self.out = out
        try:
            self.file: IO[bytes] = tempfile.TemporaryFile(dir=out.parent)  # noqa: SIM115 (closed by build_full)
        except OSError as e:
            raise BuildError(f"{out}: cannot write the bundle: {e.strerror}") from None
        self.length = 0

    def write(self, data: bytes) -> int:
        try:
            self.file.write(data)
        except OSError as e:
            raise BuildError(f"{self.out}: cannot write the bundle: {e.strerror}") from None
        offset = self.length
        self.length += len(data)
        return offset

    def rewind(self) -> IO[bytes]:
        try:
            self.file.flush()
            self.file.seek(0)
        except OSError as e:
            raise BuildError(f"{self.out}: cannot write the bundle: {e.strerror}") from None
        return self.file


@contextlib.contextmanager
def _mapped(path: Path, size: int, what: str) -> Iterator[mmap.mmap]:
    """The file mapped read-only; it must still be `size` bytes long."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                raise BuildError(f"{path}: the {what} changed size while building")
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
                yield m
    except OSError as e:
        raise BuildError(f"{path}: cannot read the {what}: {e.strerror}") from None


def _sha256(data: mmap.mmap, size: int) -> str:
    h = hashlib.sha256()
    for at in range(0, size, SEGMENT):
        h.update(data[at : at + SEGMENT])
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class _Run:
    spool: _Payload
    pool: ThreadPoolExecutor
    level: int
    in_flight: int
    tick: Callable[[int], None]
    chunk: int = CHUNK
    index: list[bytes] | None = None  # block index entries of the full images, appended in op order
    hint: Path | None = None  # --adaptive-base of this image


def _build_image(source: ImageSource, size: int, base: Path | None, run: _Run) -> tuple[list[Op], ImageEntry]:
    """One image's ops (destination offsets from 0, payload offsets in the spool) and its entry
    (op_first still 0)."""
    if base is not None:
        return _build_delta_image(source, size, base, run)
    with _mapped(source.path, size, "image") as target:
        digest = _sha256(target, size)
        held = _held(run.hint) if run.hint is not None else None
        ops = execute(
            plan_full(target, size, run.chunk, held), Inputs(target), run.spool, run.pool,
            level=run.level, in_flight=run.in_flight, tick=run.tick,
        )
        del held
        if run.index is not None:
            run.index.extend(blockindex.entries(target, op) for op in ops if op.type is OpType.REPLACE)
        return ops, ImageEntry(source.slot_class, size, digest, 0, len(ops))


def _copied(path: Path, size: int, what: str) -> bytes:
    """The file's bytes in memory (a delta's similarity search scans both images)."""
    with _mapped(path, size, what) as data:
        return bytes(data)


def _delta_ops(target: bytes, base: bytes, spool: _Payload, run: _Run) -> list[Op]:
    """The ops of `target` against `base`, their payloads in `spool`. Up to DELTA_IN_FLIGHT
    ops are kept submitted ahead of the oldest unfinished one: a pending DELTA holds its
    plan (offsets) until a worker runs it and its frame after, so many cost little; with
    `run.in_flight` (2 per thread) the planner waited on one slow large op while the other
    worker idled: ext4 24 s instead of 30-35 s at 32, the same peak RSS (1.2 GB, both
    images and the index)."""
    plan = plan_delta(target, len(target), base, len(base), run.pool)
    return execute(plan, Inputs(target, base), spool, run.pool, level=run.level,
                   in_flight=max(run.in_flight, DELTA_IN_FLIGHT), tick=run.tick)


def _build_delta_image(source: ImageSource, size: int, base: Path, run: _Run) -> tuple[list[Op], ImageEntry]:
    """`_build_image` against `base`: both images are copied into memory, hashed on the
    pool while the planner starts, and the target hashed again at the end (the image
    must not have changed while it was read)."""
    base_size = base.stat().st_size
    target_bytes = _copied(source.path, size, "image")
    base_bytes = _copied(base, base_size, "base image")
    digests = [run.pool.submit(_sha256_bytes, data) for data in (target_bytes, base_bytes)]
    ops = _delta_ops(target_bytes, base_bytes, run.spool, run)
    del target_bytes, base_bytes
    digest, base_digest = (d.result() for d in digests)
    with _mapped(source.path, size, "image") as target:
        if _sha256(target, size) != digest:
            raise BuildError(f"{source.path}: the image changed while building")
    return ops, ImageEntry(source.slot_class, size, digest, 0, len(ops), base_digest, base_size)


def _held(hint: Path) -> Callable[[bytes | mmap.mmap], bool]:
    """Whether the --adaptive-base image holds a block (anywhere, 4 KiB-aligned)."""
    size = hint.stat().st_size
    with _mapped(hint, size, "--adaptive-base image") as data:
        hashes = {blockindex.block_hash(data[at : at + blockindex.BLOCK]) for at in range(0, size, blockindex.BLOCK)}
    return lambda block: blockindex.block_hash(block) in hashes


def _write_index(spool: _Payload, ops: list[Op], index: list[bytes] | None, warn: Warn | None) -> BlockIndexRef | None:
    """The block index after the op payloads; None when not asked for, when there is
    no REPLACE op, or (with a warning) when the images have too many blocks for it."""
    if index is None:
        return None
    blocks = blockindex.index_blocks(ops)
    if blocks == 0:
        return None
    if blocks > blockindex.MAX_INDEX_BLOCKS:
        if warn is not None:
            warn(f"no block index: the images have {blocks} blocks of data, more than "
                 f"{blockindex.MAX_INDEX_BLOCKS}; adaptive download falls back to whole ops at their own offset")
        return None
    raw = b"".join(index)
    assert len(raw) == blocks * blockindex.HASH_LENGTH
    offset = spool.write(raw)
    return BlockIndexRef(offset, len(raw), hashlib.sha256(raw).hexdigest())


def _build_embedded(
    source: ImageSource, size: int, digest: str, old: Path, *, out: Path, run: _Run, first: int,
) -> tuple[list[Op], _Payload, str, int]:
    """A delta of `source` against `old`, as `--base` builds it, its payload in a spool of
    its own (payload offsets from 0). Returns its ops, that spool, the base's SHA-256 and size."""
    spool = _Payload(out)
    try:
        base_size = old.stat().st_size
        target_bytes = _copied(source.path, size, "image")
        base_bytes = _copied(old, base_size, "--delta-from image")
        base_digest = _sha256_bytes(base_bytes)
        if _sha256_bytes(target_bytes) != digest:
            raise BuildError(f"{source.path}: the image changed while building")
        if base_digest == digest:
            raise OptionError("--delta-from", f"{old} is the {source.slot_class} image itself")
        ops = _delta_ops(target_bytes, base_bytes, spool, run)
        del target_bytes, base_bytes
        if first + len(ops) > embedded_mod.MAX_EMBEDDED_OPS:
            raise OptionError("--delta-from", f"the delta from {old} needs {len(ops)} ops, the other images' largest "
                              f"deltas {first}; a device holds at most {embedded_mod.MAX_EMBEDDED_OPS} "
                              "(docs/bundle-format.md section 7.3)")
        return ops, spool, base_digest, base_size
    except BaseException:
        spool.file.close()
        raise


def _append_embedded(spool: _Payload, cls: str, ops: list[Op], delta: _Payload, base: tuple[str, int]
                     ) -> EmbeddedDeltaRef:
    """One embedded delta after what the spool holds: its op table, then its payload pieces."""
    table = pack_table(ops)
    table_offset = spool.write(table)
    source = delta.rewind()
    h = hashlib.sha256()
    payload_offset = spool.length
    while chunk := source.read(1 << 20):
        h.update(chunk)
        spool.write(chunk)
    delta.file.close()
    return EmbeddedDeltaRef(cls, base[0], base[1], table_offset, len(ops), hashlib.sha256(table).hexdigest(),
                            payload_offset, spool.length - payload_offset, h.hexdigest())


def _check_embedded(path: Path, reader: BundleReader, manifest: Manifest) -> None:
    """Every embedded op table of the written file passes the device's own checks."""
    start = reader.position
    with path.open("rb") as f:
        for k, ref in enumerate(manifest.embedded_deltas):
            f.seek(start + ref.table_offset)
            image = embedded_mod.image_of(manifest.images, ref)
            assert image is not None  # check_sections, in read_op_table
            embedded_mod.load_table(f.read(embedded_mod.table_length(ref)), ref, k, image)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_full(
    spec: BundleSpec,
    out: Path,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
    warn: Warn | None = None,
) -> BuildResult:
    """Check `spec`, build the bundle, read it back, and only then publish it as `out`.
    Nothing is left beside `out` on any failure (KeyboardInterrupt included)."""
    checked = check(spec, out, overwrite=overwrite)
    for message in checked.warnings:
        if warn is not None:
            warn(message)
    threads = spec.threads or os.cpu_count() or 1
    size_of = {s.slot_class: n for s, n in zip(spec.sources, checked.sizes, strict=True)}
    total = sum(checked.sizes) + sum(size_of[cls] for cls, _ in checked.delta_from)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    ops: list[Op] = []
    entries: list[ImageEntry] = []
    spool = _Payload(out)
    index: list[bytes] | None = [] if spec.block_index and not checked.bases else None
    with spool.file, ThreadPoolExecutor(max_workers=threads) as pool:
        for source, size in zip(spec.sources, checked.sizes, strict=True):
            base = checked.bases.get(source.slot_class)
            run = _Run(spool, pool, spec.level, 2 * threads, tick, spec.chunk, index,
                       checked.hints.get(source.slot_class))
            image_ops, entry = _build_image(source, size, base, run)
            entries.append(replace(entry, op_first=len(ops)))
            ops += image_ops
        if len(ops) > MAX_OPS:
            raise BuildError(f"the images need {len(ops)} ops; a bundle holds at most {MAX_OPS}"
                             + (" (a larger --chunk needs fewer)" if spec.chunk < CHUNK else ""))
        if checked.bases and len(ops) > MAX_DELTA_OPS:
            raise BuildError(f"the delta needs {len(ops)} ops; a delta bundle holds at most {MAX_DELTA_OPS} "
                             "(docs/bundle-format.md section 9.1): build a full bundle for this update")
        index_ref = _write_index(spool, ops, index, warn)
        embedded: list[EmbeddedDeltaRef] = []
        largest: dict[str, int] = {}  # ops of the largest delta per class: a device holds one per class
        sources = {s.slot_class: s for s in spec.sources}
        digests = {e.slot_class: e.sha256 for e in entries}
        for cls, old in checked.delta_from:
            run = _Run(spool, pool, spec.level, 2 * threads, tick)
            d_ops, d_spool, base_digest, base_size = _build_embedded(
                sources[cls], size_of[cls], digests[cls], old, out=out, run=run,
                first=sum(n for c, n in largest.items() if c != cls))
            if any(e.slot_class == cls and e.base_sha256 == base_digest for e in embedded):
                d_spool.file.close()
                raise OptionError("--delta-from", f"{old} holds the same {cls} image as an earlier --delta-from")
            largest[cls] = max(largest.get(cls, 0), len(d_ops))
            embedded.append(_append_embedded(spool, cls, d_ops, d_spool, (base_digest, base_size)))
        manifest = Manifest(
            bundle_version=spec.version,
            security_version=spec.security_version,
            compatible=spec.compatible,
            created=datetime.now(UTC).replace(microsecond=0),
            expires=spec.expires,
            images=tuple(entries),
            op_count=len(ops),
            op_table_sha256=op_table_digest(ops),
            payload_length=spool.length,
            block_index=index_ref,
            embedded_deltas=tuple(embedded),
        )
        keyring = Keyring({key_id(k.public_key()): k.public_key() for k in checked.keys}, "the signing keys")

        def read_back(path: Path) -> None:
            """The reader's own checks up to the payload: header, signatures, manifest, op table."""
            try:
                with path.open("rb") as f:
                    reader = BundleReader(f)
                    reader.read_op_table(verify(reader.read_head(), keyring))
                _check_embedded(path, reader, manifest)
            except OtaError as e:
                raise BuildError(f"{out}: the bundle reader refuses the result ({e}); nothing written") from None

        try:
            header = write_bundle_file(
                out, manifest, ops, spool.rewind(), checked.keys, overwrite=overwrite, check=read_back
            )
        except FileExistsError:
            raise OptionError("-o", f"{out} appeared while building (use --force to replace it)") from None
        except OSError as e:
            raise BuildError(f"{out}: cannot write the bundle: {e.strerror}") from None
    signers = tuple(key_id(k.public_key()) for k in checked.keys)
    return BuildResult(header, manifest, len(ops), sum(checked.sizes), header.total_length, signers,
                       checked.warnings)
