"""The `ota-bundle` options and commands of container images: `image --from-oci`,
`create --from-oci` (image and bundle in one go) and `push`. `bundler.cli`
registers them; the work is `bundler.oci.image` and `bundler.oci.artifact`."""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from bundler.build import OptionError
from bundler.oci.artifact import push
from bundler.oci.image import ImageResult, build_image
from bundler.oci.mkfs import FILESYSTEMS
from bundler.oci.registry import RegistryOptions

CREDS_ENV = "OTA_REGISTRY_CREDS"
_SIZE = re.compile(r"([0-9]{1,15})([KMGT]?)(i?B)?", re.I)


def parse_size(value: str) -> int:
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a size (bytes, or with K, M, G, T)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def add_registry_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry (docker://)")
    g.add_argument("--creds", metavar="USER:PASSWORD", help=f"registry credentials (default: ${CREDS_ENV})")
    g.add_argument("--registry-ca", metavar="FILE", help="CA certificate(s) to verify the registry's TLS certificate")
    g.add_argument("--insecure-registry", action="store_true", help="plain HTTP to the registry (a lab or loopback)")
    g.add_argument("--skopeo", action="store_true", help="pull with skopeo copy instead of the built-in client")


def add_image_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--from-oci",
        required=required,
        metavar="SRC",
        help="container image: oci:DIR[:TAG], docker-archive:FILE or docker://HOST/REPO:TAG",
    )
    p.add_argument("--fs", choices=FILESYSTEMS, default="ext4", help="filesystem of the image (default ext4)")
    p.add_argument(
        "--size",
        type=parse_size,
        help="ext4 size (default: what the files need); for erofs/squashfs the most allowed",
    )
    p.add_argument(
        "--factory-etc",
        action="store_true",
        help="also copy the image's /etc to /usr/share/factory/etc (the defaults the device's /etc merge uses)",
    )
    add_registry_options(p)


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    creds = args.creds if args.creds is not None else os.environ.get(CREDS_ENV)
    user = password = None
    if creds:
        user, sep, password = creds.partition(":")
        if not sep:
            raise OptionError("--creds", "use USER:PASSWORD")
    ca = Path(args.registry_ca) if args.registry_ca else None
    return RegistryOptions(user, password, ca, args.insecure_registry, args.skopeo)


def image_json(r: ImageResult) -> dict[str, Any]:
    s = r.stats
    return {
        "output": str(r.output),
        "fs": r.fs,
        "size": r.size,
        "epoch": r.epoch,
        "config_digest": r.config_digest,
        "layers": r.layers,
        "entries": s.entries,
        "files": s.files,
        "hardlinks": s.hardlinks,
        "devices": s.devices,
        "whiteouts": s.whiteouts,
    }


def run_image(args: argparse.Namespace) -> int:
    out = Path(args.output)
    r = build_image(
        args.from_oci,
        out,
        args.fs,
        args.size,
        overwrite=args.force,
        registry=registry_options(args),
        factory_etc=args.factory_etc,
    )
    if args.json:
        print(json.dumps(image_json(r), indent=2))
    else:
        s = r.stats
        print(
            f"wrote {out}: {r.fs}, {r.size} bytes, {r.layers} layers, {s.files} files"
            f" ({s.hardlinks} hardlinks, {s.devices} devices, {s.whiteouts} whiteouts), epoch {r.epoch}"
        )
    return 0


def image_for_create(args: argparse.Namespace, out: Path) -> tuple[Path, ImageResult]:
    """`create --from-oci`: the image built into a private file beside the bundle."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.img.", dir=out.parent if str(out.parent) else "."))
    path = work / f"rootfs.{args.fs}"
    opts = registry_options(args)
    return path, build_image(args.from_oci, path, args.fs, args.size, registry=opts, factory_etc=args.factory_etc)


def run_push(args: argparse.Namespace) -> int:
    result = push(Path(args.bundle), args.dest, registry_options(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"pushed {args.bundle} ({result['bundle_size']} bytes, version {result['bundle_version']})"
            f" to {result['reference']}; devices can pin {result['pinned']}"
        )
    return 0


def add_image_parser(sub: Any) -> None:
    p = sub.add_parser("image", help="make a filesystem image from a container image (--from-oci)")
    add_image_options(p, required=True)
    p.add_argument("-o", "--output", required=True, help="image file to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="report the image as one JSON object")
    p.set_defaults(func=run_image)


def add_push_parser(sub: Any) -> None:
    p = sub.add_parser("push", help="store a bundle in a registry as an OCI artifact")
    p.add_argument("bundle")
    p.add_argument("dest", metavar="docker://HOST/REPO:TAG")
    p.add_argument("--json", action="store_true", help="report the pushed artifact as one JSON object")
    add_registry_options(p)
    p.set_defaults(func=run_push)
