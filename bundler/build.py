"""Building a full bundle from one or more image files.

Owns three things:
- checking a `BundleSpec` before anything is written: every value that goes
  into the manifest is judged by the bundle reader's own parser
  (`bundler.format.manifest.parse`), so `create` can never sign what a device
  rejects; errors name the `ota-bundle create` option the value came from;
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
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.executor import Inputs, execute
from bundler.format import blockindex
from bundler.format import manifest as manifest_mod
from bundler.format.header import MAX_OPS, Header
from bundler.format.manifest import (
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MAX_SECURITY_VERSION,
    NAME_RULE,
    BlockIndexRef,
    ImageEntry,
    Manifest,
    format_time,
)
from bundler.format.ops import Op, OpType
from bundler.format.reader import BundleReader
from bundler.format.signing import MAX_SIGNATURES, Keyring, key_id, load_private_key, verify
from bundler.format.writer import op_table_digest, write_bundle_file
from bundler.planner import CHUNK, SEGMENT, check_chunk, plan_delta, plan_full
from ota_common.errors import OtaError
from ota_common.text import clean

DEFAULT_LEVEL = 10
DEFAULT_CHUNK = CHUNK  # measured in docs/adaptive.md: smaller chunks cost the full bundle 5-35% on ext4
MAX_LEVEL = zstandard.MAX_COMPRESSION_LEVEL
_SHOWN = 80  # characters of a rejected value shown in an error

Progress = Callable[[int, int], None]
Warn = Callable[[str], None]


class BuildError(OtaError):
    """The bundle cannot be built as asked: an input is unusable or the output cannot be written."""


class OptionError(BuildError, ValueError):
    """A value given to `ota-bundle create` (a `BundleSpec` field) is refused; names the option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclass(frozen=True, slots=True)
class ImageSource:
    """One image of a bundle: the slot class it is for and the file holding it.
    `class_option` is the option that named the class, for errors."""

    slot_class: str
    path: Path
    class_option: str = "--image"


@dataclass(frozen=True, slots=True)
class BundleSpec:
    """What `ota-bundle create` was asked for. `image` is one path (an image for
    `slot_class`) or several `ImageSource`s; `key` one private key or several
    (each signs; a device trusting any one of them accepts the bundle)."""

    image: Path | tuple[ImageSource, ...]
    key: Path | tuple[Path, ...]
    version: str
    security_version: int
    compatible: str
    expires: datetime | None = None
    slot_class: str = "rootfs"
    level: int = DEFAULT_LEVEL
    threads: int = 0  # 0: one per CPU
    base: Mapping[str, Path] | None = None  # slot class -> base image: a delta bundle for those classes
    chunk: int = DEFAULT_CHUNK  # full images: bytes of image per REPLACE op (the unit adaptive download fetches)
    block_index: bool = True  # full bundles: write the block index (docs/bundle-format.md section 7.2)
    adaptive_base: Mapping[str, Path] | None = None  # slot class -> the image most devices hold: cut chunks to it

    @property
    def sources(self) -> tuple[ImageSource, ...]:
        if isinstance(self.image, Path):
            return (ImageSource(self.slot_class, self.image, "--slot-class"),)
        return self.image

    @property
    def keys(self) -> tuple[Path, ...]:
        return (self.key,) if isinstance(self.key, Path) else self.key


@dataclass(frozen=True, slots=True)
class BuildResult:
    header: Header
    manifest: Manifest
    ops: int
    image_size: int  # all images together
    bundle_size: int
    signers: tuple[bytes, ...] = ()  # key ids, in signature block order
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckedSpec:
    """A spec that passed `check()`: the loaded keys, each image's size, and warnings."""

    keys: tuple[Ed25519PrivateKey, ...]
    sizes: tuple[int, ...]
    warnings: tuple[str, ...]
    bases: Mapping[str, Path] = field(default_factory=dict)
    hints: Mapping[str, Path] = field(default_factory=dict)  # --adaptive-base, per slot class


# --- checking a spec with the reader's rules --------------------------------

_ZERO_DIGEST = "0" * 64
_PROBE = Manifest(
    bundle_version="0",
    security_version=0,
    compatible="probe",
    created=datetime(2000, 1, 1, tzinfo=UTC),
    expires=None,
    images=(ImageEntry("probe", 1, _ZERO_DIGEST, 0, 1),),
    op_count=1,
    op_table_sha256=_ZERO_DIGEST,
    payload_length=0,
)


def _reader_accepts(**fields: Any) -> bool:
    """Whether the bundle reader's manifest parser accepts a known-good manifest
    with only `fields` changed: the one definition of what a value may be."""
    try:
        manifest_mod.parse(replace(_PROBE, **fields).encode())
    except (OtaError, ValueError, OverflowError):
        return False
    return True


def _show(value: object) -> str:
    return clean(repr(value), _SHOWN)


def check(spec: BundleSpec, out: Path, *, overwrite: bool = False, now: datetime | None = None) -> CheckedSpec:
    """Check every option before anything is written; raise `OptionError` for the first bad one."""
    if not _reader_accepts(bundle_version=spec.version):
        raise OptionError("--version", f"{_show(spec.version)} is not a valid version ({NAME_RULE})")
    if not _reader_accepts(security_version=spec.security_version):
        raise OptionError(
            "--security-version",
            f"{_show(spec.security_version)} is not a valid security version (0 to {MAX_SECURITY_VERSION})",
        )
    if not _reader_accepts(compatible=spec.compatible):
        raise OptionError("--compatible", f"{_show(spec.compatible)} is not a valid compatible string ({NAME_RULE})")
    warnings: list[str] = []
    if spec.expires is not None:
        if spec.expires.tzinfo is None or not _reader_accepts(expires=spec.expires):
            shown = _show(spec.expires.isoformat())
            raise OptionError("--expires", f"{shown} is not a time a bundle can carry (UTC, years 1000 to 9999)")
        now = now or datetime.now(UTC)
        if spec.expires <= now:
            warnings.append(
                f"--expires {format_time(spec.expires)} is already past: every device will refuse this bundle"
            )
    if not 1 <= spec.level <= MAX_LEVEL:
        raise OptionError("--level", f"{_show(spec.level)} is not a zstd level (1 to {MAX_LEVEL})")
    try:
        check_chunk(spec.chunk)
    except ValueError as e:
        raise OptionError("--chunk", str(e)) from None
    sizes = _check_images(spec.sources)
    bases = _check_bases(spec.base or {}, {s.slot_class for s in spec.sources})
    hints = _check_hints(spec.adaptive_base or {}, {s.slot_class for s in spec.sources}, bases)
    keys = _check_keys(spec.keys)
    inputs = [s.path for s in spec.sources] + list(bases.values()) + list(hints.values()) + list(spec.keys)
    _check_output(out, overwrite, inputs)
    return CheckedSpec(keys, sizes, tuple(warnings), bases, hints)


def _check_hints(hints: Mapping[str, Path], classes: set[str], bases: Mapping[str, Path]) -> dict[str, Path]:
    """--adaptive-base: checked as --base is; only for a full image."""
    for cls in hints:
        if cls in bases:
            raise OptionError("--adaptive-base", f"slot class {cls!r} is a delta (--base): it has no chunks to cut")
    try:
        return _check_bases(hints, classes)
    except OptionError as e:
        raise OptionError("--adaptive-base", str(e).removeprefix("--base: ")) from None


def _check_bases(bases: Mapping[str, Path], classes: set[str]) -> dict[str, Path]:
    for cls, path in bases.items():
        if cls not in classes:
            raise OptionError("--base", f"a base for slot class {cls!r}, but the bundle has no image for it")
        try:
            st = path.stat()
        except OSError as e:
            raise OptionError("--base", f"{path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise OptionError("--base", f"{path}: not a regular file")
        if st.st_size == 0:
            raise OptionError("--base", f"{path}: base image is empty")
        if st.st_size > MAX_IMAGE_SIZE:
            raise OptionError("--base", f"{path}: {st.st_size} bytes, a base image holds at most {MAX_IMAGE_SIZE}")
    return dict(bases)


def _check_images(sources: tuple[ImageSource, ...]) -> tuple[int, ...]:
    if not 1 <= len(sources) <= MAX_IMAGES:
        raise OptionError("--image", f"{len(sources)} images given; a bundle holds 1 to {MAX_IMAGES}")
    seen: set[str] = set()
    sizes = []
    for source in sources:
        cls = source.slot_class
        if not _reader_accepts(images=(replace(_PROBE.images[0], slot_class=cls),)):
            raise OptionError(source.class_option, f"{_show(cls)} is not a valid slot class ({NAME_RULE})")
        if cls in seen:
            raise OptionError("--image", f"two images for slot class {cls!r}; a device installs one per class")
        seen.add(cls)
        try:
            st = source.path.stat()
        except OSError as e:
            raise OptionError("--image", f"{source.path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise OptionError("--image", f"{source.path}: not a regular file")
        if st.st_size == 0:
            raise OptionError("--image", f"{source.path}: image is empty")
        if st.st_size > MAX_IMAGE_SIZE:
            limit = f"a bundle image holds at most {MAX_IMAGE_SIZE}"
            raise OptionError("--image", f"{source.path}: {st.st_size} bytes, {limit}")
        sizes.append(st.st_size)
    return tuple(sizes)


def _check_keys(paths: tuple[Path, ...]) -> tuple[Ed25519PrivateKey, ...]:
    if not 1 <= len(paths) <= MAX_SIGNATURES:
        raise OptionError("--key", f"{len(paths)} keys given; a bundle carries 1 to {MAX_SIGNATURES} signatures")
    keys: list[Ed25519PrivateKey] = []
    first: dict[bytes, Path] = {}
    for path in paths:
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read
                raise OptionError("--key", f"{path}: not a regular file")
        except OSError as e:
            raise OptionError("--key", f"{path}: {e.strerror}") from None
        try:
            key = load_private_key(path)
        except OtaError as e:
            raise OptionError("--key", str(e)) from None
        kid = key_id(key.public_key())
        if kid in first:
            raise OptionError("--key", f"{path} is the same key as {first[kid]}")
        first[kid] = path
        keys.append(key)
    return tuple(keys)


def _check_output(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    parent = out.parent
    if not parent.is_dir():
        raise OptionError("-o", f"{out}: directory {parent} does not exist")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir():
        raise OptionError("-o", f"{out} is a directory")
    for path in inputs:
        try:
            same = out.samefile(path)
        except OSError:
            continue
        if same:
            raise OptionError("-o", f"{out} is also an input ({path}); refusing to overwrite it")
    if not overwrite:
        raise OptionError("-o", f"{out} exists (use --force to replace it)")


# --- building ----------------------------------------------------------------


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
    with _mapped(source.path, size, "image") as target:
        digest = _sha256(target, size)
        if base is None:
            held = _held(run.hint) if run.hint is not None else None
            ops = execute(
                plan_full(target, size, run.chunk, held), Inputs(target), run.spool, run.pool,
                level=run.level, in_flight=run.in_flight, tick=run.tick,
            )
            del held
            if run.index is not None:
                run.index.extend(blockindex.entries(target, op) for op in ops if op.type is OpType.REPLACE)
            return ops, ImageEntry(source.slot_class, size, digest, 0, len(ops))
        base_size = base.stat().st_size
        with _mapped(base, base_size, "base image") as old:
            base_digest = _sha256(old, base_size)
            target_bytes, base_bytes = bytes(target), bytes(old)  # the similarity search scans both
        plan = plan_delta(target_bytes, size, base_bytes, base_size, run.pool)
        inputs = Inputs(target_bytes, base_bytes)
        ops = execute(plan, inputs, run.spool, run.pool, level=run.level, in_flight=run.in_flight, tick=run.tick)
        if _sha256_bytes(target_bytes) != digest:
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
    total = sum(checked.sizes)
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
        index_ref = _write_index(spool, ops, index, warn)
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
        )
        keyring = Keyring({key_id(k.public_key()): k.public_key() for k in checked.keys}, "the signing keys")

        def read_back(path: Path) -> None:
            """The reader's own checks up to the payload: header, signatures, manifest, op table."""
            try:
                with path.open("rb") as f:
                    reader = BundleReader(f)
                    reader.read_op_table(verify(reader.read_head(), keyring))
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
    return BuildResult(header, manifest, len(ops), total, header.total_length, signers, checked.warnings)
