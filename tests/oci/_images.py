"""Container images built by the tests: layer tarballs from entry lists, written
as an OCI image layout (gzip, zstd or plain layers) or as a `docker save`
archive. Entries are small tuples so a test reads like the tree it builds."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

CREATED = "2024-05-01T12:00:00Z"


@dataclass
class E:
    """One layer entry: `kind` is file, dir, symlink, hardlink, chr, blk, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    mtime: int = 1_700_000_000
    xattrs: dict[str, bytes] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def layer_tar(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = e.mtime
            info.linkname = e.link
            info.devmajor, info.devminor = e.dev
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(tars: list[bytes], created: str = CREATED) -> bytes:
    return json.dumps(
        {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_digest(t) for t in tars]},
        },
        sort_keys=True,
    ).encode()


def write_layout(
    root: Path,
    layers: list[list[E]],
    *,
    tag: str = "1",
    compression: str = "gzip",
    created: str = CREATED,
    lie_about: int | None = None,
) -> Path:
    """An OCI image layout at `root`; `lie_about=i` stores layer i's blob under
    a digest of other bytes (the manifest and file name claim what it is not)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes, digest: str | None = None) -> str:
        digest = digest or _digest(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return digest

    tars = [layer_tar(entries) for entries in layers]
    descs = []
    for i, t in enumerate(tars):
        if compression == "gzip":
            stored, mt = gzip.compress(t, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif compression == "zstd":
            stored, mt = zstandard.ZstdCompressor().compress(t), "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            stored, mt = t, "application/vnd.oci.image.layer.v1.tar"
        digest = _digest(stored)
        if lie_about == i:
            digest = _digest(stored + b"honest")
        put(stored, digest)
        descs.append({"mediaType": mt, "digest": digest, "size": len(stored)})
    config = config_for(tars, created)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": descs,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps(index))
    return root


def write_docker_archive(
    path: Path, layers: list[list[E]], *, created: str = CREATED, lie_about: int | None = None
) -> Path:
    """A `docker save`-style archive: `manifest.json`, `<hex>.json`, `<id>/layer.tar`."""
    tars = [layer_tar(entries) for entries in layers]
    config = config_for(tars, created)
    config_name = _digest(config).split(":")[1] + ".json"
    names = [f"{hashlib.sha256(b'id%d' % i).hexdigest()}/layer.tar" for i in range(len(tars))]
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["localhost/test:1"], "Layers": names}]).encode()
    with tarfile.open(path, "w") as tar:
        members = [("manifest.json", manifest), (config_name, config)]
        for i, (name, t) in enumerate(zip(names, tars, strict=True)):
            members.append((name, _tamper(t) if lie_about == i else t))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tamper(t: bytes) -> bytes:
    """The same tar with one byte of file data changed: still a valid tar, wrong diff_id."""
    b = bytearray(t)
    i = b.find(b"hello")
    assert i >= 0, "the tampered layer needs a file holding b'hello'"
    b[i] ^= 0x20
    return bytes(b)
