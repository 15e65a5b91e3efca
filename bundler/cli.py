"""`ota-bundle`: keygen, create, inspect, verify. One line per error (a
traceback only with -v); `--json` where state is printed."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bundler.build import BundleSpec, build_full
from bundler.format import manifest as manifest_mod
from bundler.format.errors import HashMismatchError, OtaError, TruncatedError
from bundler.format.header import Header
from bundler.format.manifest import Manifest, format_time, parse_time
from bundler.format.ops import Op, OpType, produce, unpack_table
from bundler.format.reader import BundleReader
from bundler.format.signing import Keyring, generate_key, verify
from hw.tty import Progress, run_reporting_errors

_ZEROS = bytes(1 << 20)


def _keygen(args: argparse.Namespace) -> int:
    priv, pub = generate_key(Path(args.dir))
    print(f"wrote {priv} (private, keep it secret) and {pub} (public, install on devices)")
    return 0


def _create(args: argparse.Namespace) -> int:
    expires = parse_time(args.expires, "--expires") if args.expires else None
    spec = BundleSpec(
        image=Path(args.image),
        key=Path(args.key),
        version=args.version,
        security_version=args.security_version,
        compatible=args.compatible,
        expires=expires,
        slot_class=args.slot_class,
        level=args.level,
    )
    progress = Progress("bundling")
    result = build_full(spec, Path(args.output), progress)
    progress.finish()
    ratio = result.bundle_size / result.image_size
    print(
        f"wrote {args.output}: version {args.version}, {result.ops} ops, image {result.image_size} bytes, "
        f"bundle {result.bundle_size} bytes ({ratio:.1%})"
    )
    return 0


def _describe(header: Header, manifest: Manifest, ops: Sequence[Op], signer: str | None) -> dict[str, Any]:
    return {
        "format_version": header.format_version,
        "bundle_version": manifest.bundle_version,
        "security_version": manifest.security_version,
        "compatible": manifest.compatible,
        "created": format_time(manifest.created),
        "expires": format_time(manifest.expires) if manifest.expires else None,
        "signer": signer,
        "images": [image.to_json() for image in manifest.images],
        "manifest_offset": header.manifest_offset,
        "signature_offset": header.signature_offset,
        "op_table_offset": header.op_table_offset,
        "payload_offset": header.payload_offset,
        "payload_length": header.payload_length,
        "bundle_length": header.total_length,
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
    with open(args.bundle, "rb") as f:
        reader = BundleReader(f)
        head = reader.read_head()
        signer = None
        if args.keyring:
            verified = verify(head, Keyring.load(Path(args.keyring)))
            manifest, signer = verified.manifest, verified.signer.hex()
            ops = reader.read_op_table(verified)
        else:
            manifest = manifest_mod.parse(head.manifest_bytes)
            raw_table = f.read(head.header.op_table_length)
            if len(raw_table) != head.header.op_table_length:
                raise TruncatedError("op table", head.header.op_table_length, len(raw_table))
            ops = unpack_table(raw_table)
    info = _describe(head.header, manifest, ops, signer)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"bundle          {args.bundle}")
    print(f"version         {info['bundle_version']} (security version {info['security_version']})")
    print(f"compatible      {info['compatible']}")
    print(f"created         {info['created']}" + (f", expires {info['expires']}" if info["expires"] else ""))
    print(f"signature       {'verified, key ' + signer[:16] if signer else 'not checked (no --keyring)'}")
    for image in manifest.images:
        print(f"image           {image.slot_class}: {image.size} bytes, sha256 {image.sha256}")
    counts = {t.name: sum(1 for op in ops if op.type is t) for t in OpType}
    print("ops             " + ", ".join(f"{n} {name}" for name, n in counts.items() if n))
    print(
        f"layout          payload at {info['payload_offset']}, {info['payload_length']} bytes;"
        f" total {info['bundle_length']}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Check the signature, the op table, every payload and extent hash, and each
    image's whole SHA-256 (zero runs included), without writing anything."""
    keyring = Keyring.load(Path(args.keyring))
    with open(args.bundle, "rb") as f:
        reader = BundleReader(f)
        verified = verify(reader.read_head(), keyring)
        ops = reader.read_op_table(verified)
        images = verified.manifest.images
        hashes = [hashlib.sha256() for _ in images]
        owner = [i for i, image in enumerate(images) for _ in range(image.op_count)]
        total = sum(op.dst_length for op in ops)
        progress = Progress("verifying")
        done = 0
        for index, op, payload in reader.iter_payload(ops):
            h = hashes[owner[index]]
            if payload is None:
                for start in range(0, op.dst_length, len(_ZEROS)):
                    h.update(_ZEROS[: min(len(_ZEROS), op.dst_length - start)])
            else:
                h.update(produce(op, payload, index))
            done += op.dst_length
            progress(done, total)
        progress.finish()
    for image, h in zip(images, hashes, strict=True):
        if h.hexdigest() != image.sha256:
            raise HashMismatchError(f"image {image.slot_class}", image.sha256, h.hexdigest())
    m = verified.manifest
    expired = m.expires is not None and m.expires < datetime.now(UTC)
    print(
        f"{args.bundle}: OK - signed by key {verified.signer.hex()[:16]}, version {m.bundle_version}, "
        f"{len(ops)} ops and {len(images)} image hash(es) verified" + (" (note: expired)" if expired else "")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ota-bundle", description="Build and check edge-ota bundles.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    p.add_argument("dir", help="directory for signing.key and signing.pub")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("create", help="build a signed full bundle from an image")
    p.add_argument("--image", required=True, help="filesystem image (ext4, squashfs, erofs, ...)")
    p.add_argument("--key", required=True, help="PEM Ed25519 private key")
    p.add_argument("--version", required=True, help="bundle version string")
    p.add_argument("--security-version", required=True, type=int, help="monotonic security version (integer)")
    p.add_argument("--compatible", required=True, help="device compatible string")
    p.add_argument("--expires", help="ISO 8601 expiry time, e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--slot-class", default="rootfs", help="slot class the image is for (default rootfs)")
    p.add_argument("--level", type=int, default=10, help="zstd level 1..22 (default 10)")
    p.add_argument("-o", "--output", required=True, help="bundle file to write (.otab)")
    p.set_defaults(func=_create)

    p = sub.add_parser("inspect", help="show a bundle's manifest and layout")
    p.add_argument("bundle")
    p.add_argument("--keyring", help="also verify the signature against this .pub file or directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="check the signature and every hash")
    p.add_argument("bundle")
    p.add_argument("--keyring", required=True, help=".pub file or directory of .pub files")
    p.set_defaults(func=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    expected = (OtaError, ValueError)
    return run_reporting_errors("ota-bundle", lambda: int(args.func(args)), expected=expected, verbose=args.verbose)

if __name__ == "__main__":
    sys.exit(main())
