"""`ota-bundle usb`: the technician's side of USB sticks (docs/media.md).

  prepare DIR BUNDLE...                       copy bundles into DIR/edge-ota/
  prepare --image stick.img --size 256M B...  the same into a new FAT image
                                              (mkfs.vfat + mtools: no root, no mount)
  report DIR | --image stick.img              the receipts devices wrote back

The layout and the receipt schema are `ota_common.media`, shared with the
agent. `prepare` reads each bundle's header and manifest first (a file that is
not a bundle is refused before anything is written; the manifest is shown
unverified: the device checks the signature) and copies into a temporary name,
fsynced and renamed into place. Receipts are read as untrusted files: bounded
in size and number, symlinks not followed, a bad one reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.format import manifest as manifest_mod
from bundler.format.manifest import Manifest
from bundler.format.reader import BundleReader
from ota_common import media as layout
from ota_common.errors import OtaError
from ota_common.fsutil import fsync_dir
from ota_common.media import Receipt
from ota_common.text import clean

FAT_FILE_LIMIT = (1 << 32) - 1
_SIZE = re.compile(r"\A(\d{1,15})([KMG]i?B?|B?)\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UsbError(OtaError):
    """A stick (directory or image) could not be prepared or read."""


@dataclass(frozen=True, slots=True)
class Prepared:
    source: Path
    name: str  # path on the stick
    manifest: Manifest
    size: int


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if m is None:
        raise UsbError(f"--size {clean(text, 40)!r}: expected a size such as 64M, 512MiB or 2G")
    return int(m.group(1)) * _UNITS[m.group(2)[:1].lower()]


def _describe(path: Path) -> tuple[Manifest, int]:
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UsbError(f"{path}: not a regular file")
            head = BundleReader(f).read_head()
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UsbError(f"{path}: {e.strerror}") from None
    except OtaError as e:
        raise UsbError(f"{path}: not a bundle: {e}") from None
    return manifest_mod.parse(head.manifest_bytes), size


def _stick_name(path: Path) -> str:
    name = path.name if layout.is_bundle_name(path.name) else f"{path.stem or 'bundle'}{layout.BUNDLE_SUFFIX}"
    return f"{layout.TOP_DIR}/{name.lstrip('.')}"


def plan(bundles: Sequence[Path]) -> list[Prepared]:
    out: list[Prepared] = []
    names: set[str] = set()
    for path in bundles:
        manifest, size = _describe(path)
        name = _stick_name(path)
        if name.lower() in names:
            raise UsbError(f"{path}: a second bundle named {name} (FAT ignores case); rename one")
        names.add(name.lower())
        out.append(Prepared(path, name, manifest, size))
    return out


def prepare_dir(directory: Path, bundles: Sequence[Path]) -> list[Prepared]:
    items = plan(bundles)
    top = directory / layout.TOP_DIR
    (top / layout.REPORTS_DIR).mkdir(parents=True, exist_ok=True)
    for item in items:
        dest = directory / item.name
        fd, temp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=top)
        try:
            with os.fdopen(fd, "wb") as out, item.source.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    fsync_dir(top)
    return items


def _mtools(argv: list[str]) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
                                env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    except FileNotFoundError:
        raise UsbError(f"{argv[0]} not found: install dosfstools and mtools") from None
    if result.returncode != 0:
        lines = (result.stderr + result.stdout).strip().splitlines()
        raise UsbError(f"{argv[0]} failed: {clean(lines[-1] if lines else result.returncode, 200)}")


def prepare_image(image: Path, size: int, bundles: Sequence[Path], *, force: bool = False) -> list[Prepared]:
    """A new FAT image of `size` bytes holding the layout and `bundles`."""
    items = plan(bundles)
    for item in items:
        if item.size > FAT_FILE_LIMIT:
            raise UsbError(f"{item.source}: {item.size} bytes; FAT holds files of at most 4 GiB - 1")
    need = sum(i.size for i in items) + (2 << 20)
    if size < need:
        raise UsbError(f"--size {size} bytes is too small for the bundles (at least {need})")
    if image.exists() and not force:
        raise UsbError(f"{image} exists; --force replaces it")
    temp = image.with_name(f".{image.name}.tmp")
    try:
        with temp.open("wb") as f:
            f.truncate(size)
        _mtools(["mkfs.vfat", "-n", "OTASTICK", str(temp)])
        target = f"::{layout.TOP_DIR}"
        _mtools(["mmd", "-i", str(temp), target, f"{target}/{layout.REPORTS_DIR}"])
        for item in items:
            _mtools(["mcopy", "-i", str(temp), str(item.source), f"::{item.name}"])
        with temp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, image)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return items


# --- receipts ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    file: str
    receipt: Receipt | None
    problem: str = ""


def _open_dir(parent: int, want: str) -> int | None:
    with os.scandir(parent) as it:
        match = next((e.name for e in it if e.name.lower() == want and e.is_dir(follow_symlinks=False)), None)
    return None if match is None else os.open(match, DIR_FLAGS, dir_fd=parent)


def read_receipts(directory: Path) -> list[Found]:
    """Every receipt in DIR/edge-ota/reports, oldest first (bad ones with their problem)."""
    root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        top = _open_dir(root, layout.TOP_DIR)
    finally:
        os.close(root)
    if top is None:
        return []
    try:
        reports = _open_dir(top, layout.REPORTS_DIR)
    finally:
        os.close(top)
    if reports is None:
        return []
    found: list[Found] = []
    try:
        with os.scandir(reports) as it:
            names = sorted(e.name for e in it if e.name.lower().endswith(".json") and not e.name.startswith("."))
        for name in names[: layout.MAX_RECEIPTS]:
            found.append(_read_one(reports, name))
        if len(names) > layout.MAX_RECEIPTS:
            found.append(Found("...", None, f"{len(names) - layout.MAX_RECEIPTS} more receipts not read"))
    finally:
        os.close(reports)
    found.sort(key=lambda f: (f.receipt.time if f.receipt else "", f.file))
    return found


def _read_one(dir_fd: int, name: str) -> Found:
    shown = clean(name, layout.NAME_LIMIT)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        return Found(shown, None, f"not opened: {e.strerror}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Found(shown, None, "not a regular file")
        raw = os.read(fd, layout.MAX_RECEIPT + 1)
    except OSError as e:
        return Found(shown, None, f"unreadable: {e.strerror}")
    finally:
        os.close(fd)
    try:
        return Found(shown, Receipt.decode(raw))
    except ValueError as e:
        return Found(shown, None, clean(e, 200))


@contextlib.contextmanager
def _image_copy(image: Path) -> Iterator[Path]:
    """The image's edge-ota/reports copied out with mtools (no mount needed)."""
    with tempfile.TemporaryDirectory(prefix="ota-usb-") as tmp:
        dest = Path(tmp) / layout.TOP_DIR
        dest.mkdir()
        with contextlib.suppress(UsbError):  # no reports directory: no receipts
            _mtools(["mcopy", "-s", "-n", "-i", str(image), f"::{layout.TOP_DIR}/{layout.REPORTS_DIR}", str(dest)])
        yield Path(tmp)


# --- command line -----------------------------------------------------------


def _prepare(args: argparse.Namespace) -> int:
    bundles = [Path(b) for b in args.bundle]
    if args.image:
        if args.dir:  # with --image every positional argument is a bundle
            bundles.insert(0, Path(args.dir))
        if not args.size:
            raise UsbError("--image needs --size (e.g. --size 256M)")
        items = prepare_image(Path(args.image), parse_size(args.size), bundles, force=args.force)
        where = args.image
    else:
        if not args.dir:
            raise UsbError("give the stick's directory (DIR) or --image FILE --size SIZE")
        items = prepare_dir(Path(args.dir), bundles)
        where = args.dir
    doc = [{"file": i.name, "bundle_version": i.manifest.bundle_version, "compatible": i.manifest.compatible,
            "security_version": i.manifest.security_version, "size": i.size} for i in items]
    if args.json:
        print(json.dumps({"stick": str(where), "bundles": doc}))
        return 0
    for d in doc:
        print(f"{where}: {d['file']}: version {d['bundle_version']} for {d['compatible']} "
              f"(security version {d['security_version']}, unverified here: the device checks the signature)")
    return 0


def _report(args: argparse.Namespace) -> int:
    if bool(args.image) == bool(args.dir):
        raise UsbError("give the stick's directory (DIR) or --image FILE")
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(_image_copy(Path(args.image))) if args.image else Path(args.dir)
        try:
            found = read_receipts(directory)
        except OSError as e:
            raise UsbError(f"{directory}: {e.strerror}") from None
    if args.json:
        out: list[dict[str, Any]] = [
            {"file": f.file, "receipt": f.receipt.to_json() if f.receipt else None, "problem": f.problem or None}
            for f in found
        ]
        print(json.dumps({"receipts": out}))
        return 0
    if not found:
        print("no receipts on the stick")
    for f in found:
        r = f.receipt
        if r is None:
            print(f"{f.file}: not a receipt: {f.problem}", file=sys.stderr)
            continue
        print(f"{r.time} {r.device}: {r.result.value} ({r.old_version or '-'} -> {r.new_version or '-'}): "
              f"{r.reason}")
        for i in r.ignored:
            print(f"    ignored {i.file}: {i.reason}")
    return 0


def add_parser(sub: Any) -> None:
    usb = sub.add_parser("usb", help="make USB sticks for devices and read their receipts")
    usbsub = usb.add_subparsers(dest="usb_command", required=True)
    p = usbsub.add_parser("prepare", help="lay out a stick (a mounted directory or a new FAT image)")
    p.add_argument("dir", nargs="?", help="the stick's mounted directory")
    p.add_argument("bundle", nargs="+", help="bundle files (.otab) to put on it")
    p.add_argument("--image", help="write a new FAT image file instead of a directory")
    p.add_argument("--size", help="size of the image (e.g. 256M, 2G)")
    p.add_argument("--force", action="store_true", help="replace an existing image")
    p.add_argument("--json", action="store_true", help="report as one JSON object")
    p.set_defaults(func=_prepare)
    p = usbsub.add_parser("report", help="print the receipts devices wrote back onto a stick")
    p.add_argument("dir", nargs="?", help="the stick's mounted directory")
    p.add_argument("--image", help="a FAT image file instead of a directory")
    p.add_argument("--json", action="store_true", help="the receipts as one JSON object")
    p.set_defaults(func=_report)
