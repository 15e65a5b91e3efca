"""`ota-bundle`: keygen, create, inspect, verify, usb (bundler.usb); image and push
(container images and registries, `bundler.oci.cli`). One line per error (a
traceback only with -v); `--json` on every command that reports (one JSON
object on stdout, and errors as one JSON object on stderr)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from bundler import usb
from bundler.build import DEFAULT_CHUNK, BuildResult, BundleSpec, ImageSource, OptionError, build_full
from bundler.format import manifest as manifest_mod
from bundler.format.apply import ExtentSource, FileSource, NoSource, apply_op
from bundler.format.errors import FormatError, HashMismatchError, TruncatedError
from bundler.format.header import Header
from bundler.format.manifest import ImageEntry, Manifest, format_time, parse_time
from bundler.format.ops import Op, OpType, unpack_table
from bundler.format.reader import BundleReader
from bundler.format.signing import Keyring, Signature, generate_key, unpack_signatures, verify
from bundler.oci import cli as oci_cli
from ota_common.errors import OtaError
from ota_common.text import clean
from ota_common.tty import Progress, run_reporting_errors, version_string

PROG = "ota-bundle"
_ZEROS = bytes(1 << 20)


class Interrupted(OtaError):
    """Ctrl-C: the command stopped; whatever it was writing was removed."""


def _warn(message: str, as_json: bool) -> None:
    message = clean(message, 600)
    if as_json:
        print(json.dumps({"warning": {"message": message}, "program": PROG}), file=sys.stderr)
    else:
        print(f"{PROG}: warning: {message}", file=sys.stderr)


def _keygen(args: argparse.Namespace) -> int:
    priv, pub = generate_key(Path(args.dir))
    print(f"wrote {priv} (private, keep it secret) and {pub} (public, install on devices)")
    return 0


def _image_sources(values: list[str], slot_class: str | None) -> tuple[ImageSource, ...]:
    """`--image CLASS=PATH` (repeatable), or a plain `--image PATH` for `--slot-class`
    (default rootfs). A value is CLASS=PATH when it has a `=` with no `/` before it;
    a path containing `=` can be written with a directory (./a=b.img)."""
    sources = []
    plain = False
    for value in values:
        cls, sep, path = value.partition("=")
        if sep and "/" not in cls:
            sources.append(ImageSource(cls, Path(path), "--image"))
        else:
            plain = True
            sources.append(ImageSource(slot_class or "rootfs", Path(value), "--slot-class"))
    if slot_class is not None and not plain:
        raise OptionError("--slot-class", "applies only to a plain --image PATH; every image here is CLASS=PATH")
    return tuple(sources)


def _bases(values: list[str] | None, images: list[str], slot_class: str | None) -> dict[str, Path]:
    """`--base CLASS=PATH` (repeatable), or a plain `--base PATH` for the bundle's only image."""
    bases: dict[str, Path] = {}
    for value in values or []:
        cls, sep, path = value.partition("=")
        if not (sep and "/" not in cls):
            sources = _image_sources(images, slot_class)
            if len(sources) != 1:
                raise OptionError("--base", "a plain --base PATH needs exactly one --image; write --base CLASS=PATH")
            cls, path = sources[0].slot_class, value
        if cls in bases:
            raise OptionError("--base", f"two bases for slot class {cls!r}")
        bases[cls] = Path(path)
    return bases


def _hints(values: list[str] | None, images: list[str], slot_class: str | None) -> dict[str, Path]:
    """`--adaptive-base [CLASS=]PATH`, read as --base is."""
    try:
        return _bases(values, images, slot_class)
    except OptionError as e:
        message = str(e).removeprefix("--base: ").replace("--base", "--adaptive-base")
        raise OptionError("--adaptive-base", message) from None


def _delta_from(values: list[str] | None, images: list[str], slot_class: str | None) -> tuple[tuple[str, Path], ...]:
    """`--delta-from [CLASS=]PATH` (repeatable, several per class): read as --base is."""
    olds: list[tuple[str, Path]] = []
    for value in values or []:
        try:
            olds.extend(_bases([value], images, slot_class).items())
        except OptionError as e:
            message = str(e).removeprefix("--base: ").replace("--base", "--delta-from")
            raise OptionError("--delta-from", message) from None
    return tuple(olds)


def _chunk_size(text: str) -> int:
    """--chunk: bytes, or a number with K/M (KiB/MiB)."""
    units = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
    number = text.strip().rstrip("KkMmIiBb")
    unit = text.strip()[len(number):].lower()
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"{clean(text, 40)!r} is not a size such as 64K or 1M")
    return int(number) * units[unit]


def _create(args: argparse.Namespace) -> int:
    expires = None
    if args.expires:
        try:
            expires = parse_time(args.expires, "--expires")
        except (FormatError, ValueError, OverflowError):
            example = "e.g. 2027-01-01T00:00:00Z"
            shown = clean(repr(args.expires), 80)
            raise OptionError("--expires", f"{shown} is not an ISO 8601 time with a zone, {example}") from None
    if bool(args.image) == bool(args.from_oci):
        raise OptionError("--image", "give --image (image files) or --from-oci (a container image), one of them")
    if args.from_oci:
        return _create_from_oci(args, expires)
    return _create_bundle(args, expires, _image_sources(args.image, args.slot_class))


def _create_from_oci(args: argparse.Namespace, expires: datetime | None) -> int:
    """`create --from-oci SRC`: the container image made into a filesystem image
    beside the output, bundled, and the image removed."""
    image, _ = oci_cli.image_for_create(args, Path(args.output))
    try:
        return _create_bundle(args, expires, (ImageSource(args.slot_class or "rootfs", image, "--slot-class"),))
    finally:
        image.unlink(missing_ok=True)
        image.parent.rmdir()


def _create_bundle(args: argparse.Namespace, expires: datetime | None, sources: tuple[ImageSource, ...]) -> int:
    spec = BundleSpec(
        image=sources,
        key=tuple(Path(k) for k in args.key),
        version=args.version,
        security_version=args.security_version,
        compatible=args.compatible,
        expires=expires,
        level=args.level,
        base=_bases(args.base, args.image, args.slot_class),
        chunk=args.chunk,
        block_index=args.block_index,
        adaptive_base=_hints(args.adaptive_base, args.image, args.slot_class),
        delta_from=_delta_from(args.delta_from, args.image, args.slot_class),
    )
    progress = None if args.json else Progress("bundling")
    out = Path(args.output)
    result = build_full(spec, out, progress, overwrite=args.force, warn=lambda m: _warn(m, args.json))
    if progress:
        progress.finish()
    if args.json:
        print(json.dumps(_created(out, result), indent=2))
        return 0
    m = result.manifest
    ratio = result.bundle_size / result.image_size
    if len(m.images) == 1:
        images = f"image {result.image_size} bytes"
    else:
        images = f"{len(m.images)} images (" + ", ".join(f"{i.slot_class} {i.size}" for i in m.images) + " bytes)"
    signers = "" if len(result.signers) == 1 else f", signed by {len(result.signers)} keys"
    for ref in m.embedded_deltas:
        print(f"embedded delta  {ref.slot_class} from base {ref.base_sha256[:16]}: {ref.table_count} ops, "
              f"{ref.table_count * 128 + ref.payload_length} bytes")
    print(
        f"wrote {out}: version {m.bundle_version}, {result.ops} ops, {images}, "
        f"bundle {result.bundle_size} bytes ({ratio:.1%}){signers}"
    )
    return 0


def _created(out: Path, result: BuildResult) -> dict[str, Any]:
    m = result.manifest
    return {
        "output": str(out),
        "bundle_version": m.bundle_version,
        "security_version": m.security_version,
        "compatible": m.compatible,
        "created": format_time(m.created),
        "expires": format_time(m.expires) if m.expires else None,
        "images": [image.to_json() for image in m.images],
        "ops": result.ops,
        "image_size": result.image_size,
        "bundle_size": result.bundle_size,
        "signers": [kid.hex() for kid in result.signers],
        "warnings": list(result.warnings),
    }


def _signatures(raw: bytes, keyring: Keyring | None) -> list[dict[str, Any]]:
    """Every entry of the signature block: key id, algorithm, and whether the keyring holds the key."""
    entries: list[Signature] = unpack_signatures(raw)
    return [
        {
            "key_id": s.key_id.hex(),
            "algorithm": s.algorithm,
            "in_keyring": None if keyring is None else s.key_id in keyring.keys,
        }
        for s in entries
    ]


def _signers_line(signatures: list[dict[str, Any]]) -> str:
    def one(s: dict[str, Any]) -> str:
        mark = {True: " (in keyring)", False: " (not in keyring)", None: ""}[s["in_keyring"]]
        return f"{s['key_id'][:16]}{mark}"

    n = len(signatures)
    return f"{n} key{'s' if n != 1 else ''}: " + ", ".join(one(s) for s in signatures)


def _describe(
    header: Header, manifest: Manifest, ops: Sequence[Op], signer: str | None, signatures: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "format_version": header.format_version,
        "bundle_version": manifest.bundle_version,
        "security_version": manifest.security_version,
        "compatible": manifest.compatible,
        "created": format_time(manifest.created),
        "expires": format_time(manifest.expires) if manifest.expires else None,
        "signer": signer,
        "signatures": signatures,
        "images": [image.to_json() for image in manifest.images],
        "manifest_offset": header.manifest_offset,
        "signature_offset": header.signature_offset,
        "op_table_offset": header.op_table_offset,
        "payload_offset": header.payload_offset,
        "payload_length": header.payload_length,
        "bundle_length": header.total_length,
        "block_index": manifest.block_index.to_json() if manifest.block_index else None,
        "embedded_deltas": [e.to_json() for e in manifest.embedded_deltas],
        "operations": [
            {
                "index": i,
                "type": op.type.name,
                "dst_offset": op.dst_offset,
                "dst_length": op.dst_length,
                "payload_offset": op.payload_offset,
                "payload_length": op.payload_length,
            }
            for i, op in enumerate(ops)
        ],
    }


def _inspect(args: argparse.Namespace) -> int:
    """Show a bundle's manifest and layout. The signature is checked when a
    keyring is given; without one the contents are shown as *unverified*."""
    keyring = Keyring.load(Path(args.keyring)) if args.keyring else None
    with open(args.bundle, "rb") as f:
        reader = BundleReader(f)
        head = reader.read_head()
        signatures = _signatures(head.signature_bytes, keyring)
        signer = None
        if keyring is not None:
            verified = verify(head, keyring)
            manifest, signer = verified.manifest, verified.signer.hex()
            ops = reader.read_op_table(verified)
        else:
            manifest = manifest_mod.parse(head.manifest_bytes)
            raw_table = f.read(head.header.op_table_length)
            if len(raw_table) != head.header.op_table_length:
                raise TruncatedError("op table", head.header.op_table_length, len(raw_table))
            ops = unpack_table(raw_table)
    info = _describe(head.header, manifest, ops, signer, signatures)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"bundle          {args.bundle}")
    print(f"version         {info['bundle_version']} (security version {info['security_version']})")
    print(f"compatible      {info['compatible']}")
    print(f"created         {info['created']}" + (f", expires {info['expires']}" if info["expires"] else ""))
    print(f"signature       {'verified, key ' + signer[:16] if signer else 'not checked (no --keyring)'}")
    print(f"signed by       {_signers_line(signatures)}")
    for image in manifest.images:
        print(f"image           {image.slot_class}: {image.size} bytes, sha256 {image.sha256}")
    counts = {t.name: sum(1 for op in ops if op.type is t) for t in OpType}
    print("ops             " + ", ".join(f"{n} {name}" for name, n in counts.items() if n))
    print(
        f"layout          payload at {info['payload_offset']}, {info['payload_length']} bytes;"
        f" total {info['bundle_length']}"
    )
    if info["block_index"]:
        index = info["block_index"]
        print(f"block index     payload offset {index['offset']}, {index['length'] // 8} blocks (adaptive download)")
    for ref in manifest.embedded_deltas:
        print(f"embedded delta  {ref.slot_class} from base {ref.base_sha256[:16]} ({ref.base_size} bytes): "
              f"{ref.table_count} ops, {ref.table_count * 128 + ref.payload_length} bytes at payload offset "
              f"{ref.table_offset} (adaptive download)")
    return 0


def _verify_bases(values: list[str] | None, images: Sequence[ImageEntry]) -> dict[str, Path]:
    """The base image of each delta image, from `--base`; refused when one is missing or does not match."""
    given: dict[str, Path] = {}
    for value in values or []:
        cls, sep, path = value.partition("=")
        if not (sep and "/" not in cls):
            if len(images) != 1:
                raise OptionError("--base", "the bundle has several images; write --base CLASS=PATH")
            cls, path = images[0].slot_class, value
        given[cls] = Path(path)
    for image in images:
        if image.base_sha256 is None:
            continue
        base = given.get(image.slot_class)
        if base is None:
            raise OptionError("--base", f"image {image.slot_class} is a delta: give its base image with --base")
        try:
            size = base.stat().st_size
            digest = file_digest(base)
        except OSError as e:
            raise OptionError("--base", f"{base}: {e.strerror}") from None
        if size != image.base_size or digest != image.base_sha256:
            raise OptionError(
                "--base", f"{base} is not the base of image {image.slot_class} (sha256 {image.base_sha256[:16]}…)"
            )
    return given


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verify(args: argparse.Namespace) -> int:
    """Check the signature, the op table, every payload and extent hash, and each
    image's whole SHA-256 (zero runs included), without writing anything."""
    keyring = Keyring.load(Path(args.keyring))
    with open(args.bundle, "rb") as f:
        reader = BundleReader(f)
        head = reader.read_head()
        signatures = _signatures(head.signature_bytes, keyring)
        verified = verify(head, keyring)
        ops = reader.read_op_table(verified)
        images = verified.manifest.images
        bases = _verify_bases(args.base, images)
        hashes = [hashlib.sha256() for _ in images]
        owner = [i for i, image in enumerate(images) for _ in range(image.op_count)]
        total = sum(op.dst_length for op in ops)
        progress = None if args.json else Progress("verifying")
        done = 0
        with contextlib.ExitStack() as stack:
            # A delta image is rebuilt into an anonymous file: its DELTA ops may read the target written so far.
            rebuilt: list[IO[bytes] | None] = []
            sources: list[ExtentSource] = []
            for image in images:
                base = bases.get(image.slot_class)
                if base is None:
                    rebuilt.append(None)
                    sources.append(NoSource())
                    continue
                spool = stack.enter_context(tempfile.NamedTemporaryFile(prefix=".ota-verify-"))
                rebuilt.append(spool)
                sources.append(stack.enter_context(FileSource(base, Path(spool.name))))
            for index, op, payload in reader.iter_payload(ops):
                k = owner[index]
                h = hashes[k]
                extent = apply_op(op, payload, index, sources[k], images[k].base_size or 0)
                spool_file = rebuilt[k]
                if extent is None:
                    for start in range(0, op.dst_length, len(_ZEROS)):
                        h.update(_ZEROS[: min(len(_ZEROS), op.dst_length - start)])
                    if spool_file is not None:
                        spool_file.truncate(op.dst_offset + op.dst_length)
                else:
                    h.update(extent)
                    if spool_file is not None:
                        spool_file.seek(op.dst_offset)
                        spool_file.write(extent)
                        spool_file.flush()
                done += op.dst_length
                if progress:
                    progress(done, total)
        if progress:
            progress.finish()
    for image, h in zip(images, hashes, strict=True):
        if h.hexdigest() != image.sha256:
            raise HashMismatchError(f"image {image.slot_class}", image.sha256, h.hexdigest())
    m = verified.manifest
    expired = m.expires is not None and m.expires < datetime.now(UTC)
    if args.json:
        doc = {
            "bundle": args.bundle,
            "ok": True,
            "signer": verified.signer.hex(),
            "signatures": signatures,
            "bundle_version": m.bundle_version,
            "security_version": m.security_version,
            "compatible": m.compatible,
            "created": format_time(m.created),
            "expires": format_time(m.expires) if m.expires else None,
            "expired": expired,
            "ops": len(ops),
            "images": [{"slot_class": i.slot_class, "size": i.size, "sha256": i.sha256} for i in images],
        }
        print(json.dumps(doc, indent=2))
        return 0
    others = f"; signed by {_signers_line(signatures)}" if len(signatures) > 1 else ""
    print(
        f"{args.bundle}: OK - signed by key {verified.signer.hex()[:16]}, version {m.bundle_version}, "
        f"{len(ops)} ops and {len(images)} image hash(es) verified" + (" (note: expired)" if expired else "") + others
    )
    return 0


class UsageError(Exception):
    """A command line argparse refuses; carries the usage of the (sub)command."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(self.format_usage(), message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Build and check edge-ota bundles.")
    parser.add_argument("--version", action="version", version=version_string(PROG))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    p.add_argument("dir", help="directory for signing.key and signing.pub")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("create", help="build a signed full bundle from one or more images")
    p.add_argument(
        "--image",
        action="append",
        metavar="[CLASS=]PATH",
        help="filesystem image (ext4, squashfs, erofs, ...) for slot class CLASS; repeat for several classes."
        " A plain PATH is the image for --slot-class",
    )
    p.add_argument(
        "--key",
        required=True,
        action="append",
        help="PEM Ed25519 private key; repeat to sign with several keys (key rotation, up to 16)",
    )
    p.add_argument("--version", required=True, help="bundle version string (1-128 of A-Z a-z 0-9 . _ + : -)")
    p.add_argument("--security-version", required=True, type=int, help="monotonic security version (integer)")
    p.add_argument("--compatible", required=True, help="device compatible string")
    p.add_argument("--expires", help="ISO 8601 expiry time, e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--slot-class", help="slot class of a plain --image PATH (default rootfs)")
    p.add_argument(
        "--base",
        action="append",
        metavar="[CLASS=]PATH",
        help="build a delta against this base image (what the device runs now); repeat per slot class",
    )
    p.add_argument("--level", type=int, default=10, help="zstd level 1..22 (default 10)")
    p.add_argument("--chunk", type=_chunk_size, default=DEFAULT_CHUNK, metavar="SIZE",
                   help="full images: image bytes per REPLACE op, the unit adaptive download fetches "
                        "(a power of two, 4K to 4M; default 4M; docs/adaptive.md)")
    p.add_argument("--adaptive-base", action="append", metavar="[CLASS=]PATH",
                   help="full images: also cut chunks where blocks this image (what most devices run) holds "
                        "meet new ones, so their adaptive downloads fetch little more than the new blocks")
    p.add_argument("--delta-from", action="append", metavar="[CLASS=]PATH",
                   help="full images: also embed a delta against this older image (repeatable); a device running "
                        "it that installs adaptively from a server fetches only that delta (docs/adaptive.md)")
    p.add_argument("--no-block-index", dest="block_index", action="store_false",
                   help="full bundles: leave out the block index that adaptive download matches local blocks with")
    p.add_argument("-o", "--output", required=True, help="bundle file to write (.otab)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="report the bundle as one JSON object")
    oci_cli.add_image_options(p, required=False)
    p.set_defaults(func=_create)

    oci_cli.add_image_parser(sub)
    oci_cli.add_push_parser(sub)

    p = sub.add_parser("inspect", help="show a bundle's manifest and layout")
    p.add_argument("bundle")
    p.add_argument("--keyring", help="also verify the signature against this .pub file or directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="check the signature and every hash")
    p.add_argument("bundle")
    p.add_argument("--keyring", required=True, help=".pub file or directory of .pub files")
    p.add_argument(
        "--base",
        action="append",
        metavar="[CLASS=]PATH",
        help="base image of a delta bundle's image (CLASS= when the bundle has several)",
    )
    p.add_argument("--json", action="store_true", help="report the result as one JSON object")
    p.set_defaults(func=_verify)

    usb.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        if "--json" in argv:
            error = {"type": "UsageError", "message": clean(str(e), 600)}
            print(json.dumps({"error": error, "program": PROG}), file=sys.stderr)
        else:
            print(f"{e.usage}{PROG}: error: {clean(str(e), 600)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    interrupted = False

    def command() -> int:
        nonlocal interrupted
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            interrupted = True
            raise Interrupted("interrupted; nothing was written") from None

    rc = run_reporting_errors(
        PROG,
        command,
        expected=(OtaError, ValueError),
        verbose=args.verbose,
        json_errors=getattr(args, "json", False),
    )
    return 130 if interrupted else rc


if __name__ == "__main__":
    sys.exit(main())
