"""What `ota-bundle create` is asked for (`BundleSpec`), and checking it before
anything is written.

Every value that goes into the manifest is judged by the bundle reader's own
parser (`bundler.format.manifest.parse`), so `create` can never sign what a
device rejects; errors name the `ota-bundle create` option the value came from.
The inputs are checked too: images (regular files or block devices, sizes),
bases and `--delta-from` images per slot class, keys, and the output (never one
of the inputs). `bundler.build` runs the build of a checked spec.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.format import manifest as manifest_mod
from bundler.format.manifest import (
    MAX_EMBEDDED,
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MAX_SECURITY_VERSION,
    NAME_RULE,
    ImageEntry,
    Manifest,
    format_time,
)
from bundler.format.signing import MAX_SIGNATURES, key_id, load_private_key
from bundler.planner import CHUNK, check_chunk
from ota_common.errors import OtaError
from ota_common.text import clean

Progress = Callable[[int, int], None]
Warn = Callable[[str], None]


DEFAULT_LEVEL = 10
DEFAULT_CHUNK = CHUNK  # measured in docs/adaptive.md: smaller chunks cost the full bundle 5-35% on ext4
MAX_LEVEL = zstandard.MAX_COMPRESSION_LEVEL
_SHOWN = 80  # characters of a rejected value shown in an error


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
    delta_from: tuple[tuple[str, Path], ...] = ()  # (slot class, older image): embed a delta against each

    @property
    def sources(self) -> tuple[ImageSource, ...]:
        if isinstance(self.image, Path):
            return (ImageSource(self.slot_class, self.image, "--slot-class"),)
        return self.image

    @property
    def keys(self) -> tuple[Path, ...]:
        return (self.key,) if isinstance(self.key, Path) else self.key


@dataclass(frozen=True, slots=True)
class CheckedSpec:
    """A spec that passed `check()`: the loaded keys, each image's size, and warnings."""

    keys: tuple[Ed25519PrivateKey, ...]
    sizes: tuple[int, ...]
    warnings: tuple[str, ...]
    bases: Mapping[str, Path] = field(default_factory=dict)
    hints: Mapping[str, Path] = field(default_factory=dict)  # --adaptive-base, per slot class
    delta_from: tuple[tuple[str, Path], ...] = ()  # --delta-from, checked


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
    delta_from = _check_delta_from(spec.delta_from, {s.slot_class for s in spec.sources}, bases)
    keys = _check_keys(spec.keys)
    inputs = [s.path for s in spec.sources] + list(bases.values()) + list(hints.values()) + list(spec.keys)
    inputs += [path for _, path in delta_from]
    _check_output(out, overwrite, inputs)
    return CheckedSpec(keys, sizes, tuple(warnings), bases, hints, delta_from)


def _check_delta_from(
    olds: tuple[tuple[str, Path], ...], classes: set[str], bases: Mapping[str, Path]
) -> tuple[tuple[str, Path], ...]:
    """--delta-from: each an older image of a full image's class, checked as --base is;
    at most MAX_EMBEDDED, never the same file twice for one class."""
    if len(olds) > MAX_EMBEDDED:
        raise OptionError("--delta-from", f"{len(olds)} given; a bundle carries at most {MAX_EMBEDDED} deltas")
    seen: dict[tuple[str, int, int], Path] = {}
    for cls, path in olds:
        if cls in bases:
            raise OptionError("--delta-from", f"slot class {cls!r} is a delta (--base): only a full image "
                              "carries embedded deltas")
        try:
            _check_bases({cls: path}, classes)
        except OptionError as e:
            raise OptionError("--delta-from", str(e).removeprefix("--base: ")) from None
        st = path.stat()
        if (cls, st.st_dev, st.st_ino) in seen:
            raise OptionError("--delta-from", f"{path} is given twice for slot class {cls!r}")
        seen[(cls, st.st_dev, st.st_ino)] = path
    return olds


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
        _image_file("--base", path, "base image")
    return dict(bases)


def _image_file(option: str, path: Path, what: str) -> int:
    """The size of an image file `option` names: a regular, non-empty file within MAX_IMAGE_SIZE."""
    try:
        st = path.stat()
    except OSError as e:
        raise OptionError(option, f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OptionError(option, f"{path}: not a regular file")
    if st.st_size == 0:
        raise OptionError(option, f"{path}: {what} is empty")
    if st.st_size > MAX_IMAGE_SIZE:
        raise OptionError(option, f"{path}: {st.st_size} bytes; an image holds at most {MAX_IMAGE_SIZE}")
    return st.st_size


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
        sizes.append(_image_file("--image", source.path, "image"))
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


