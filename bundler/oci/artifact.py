"""`ota-bundle push BUNDLE docker://HOST/REPO:TAG`: a bundle stored in a
registry as an OCI artifact (image-spec 1.1 "artifact" guidance): a manifest
with its own `artifactType`, the empty config (`{}`), and the bundle as its one
layer; the signed manifest's fields as annotations, so `skopeo inspect` or a
registry UI shows what a tag holds without downloading it.

The annotations are for people and tools; a device trusts only the bundle's
own signature (`agent.oci` finds the layer by its media type and streams it
through the normal reader). The media types are repeated in `agent.oci`, which
cannot import the bundler; a unit test holds them equal."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bundler.format import manifest as manifest_mod
from bundler.format.manifest import format_time
from bundler.format.reader import BundleReader
from bundler.oci.errors import OciError
from bundler.oci.registry import Registry, split_host
from bundler.oci.source import parse_docker_ref

ARTIFACT_TYPE = "application/vnd.edge-ota.bundle.v1"
BUNDLE_MEDIA_TYPE = "application/vnd.edge-ota.bundle.v1.otab"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
PREFIX = "io.edge-ota.bundle."


def bundle_annotations(manifest: manifest_mod.Manifest, filename: str) -> dict[str, str]:
    notes = {
        "org.opencontainers.image.created": format_time(manifest.created),
        "org.opencontainers.image.version": manifest.bundle_version,
        "org.opencontainers.image.title": filename,
        PREFIX + "version": manifest.bundle_version,
        PREFIX + "security-version": str(manifest.security_version),
        PREFIX + "compatible": manifest.compatible,
        PREFIX + "images": ",".join(f"{i.slot_class}:{i.size}:sha256:{i.sha256}" for i in manifest.images),
    }
    if manifest.expires is not None:
        notes[PREFIX + "expires"] = format_time(manifest.expires)
    return notes


def artifact_manifest(bundle_digest: str, bundle_size: int, notes: dict[str, str]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest(),
            "size": len(EMPTY_CONFIG),
        },
        "layers": [
            {
                "mediaType": BUNDLE_MEDIA_TYPE,
                "digest": bundle_digest,
                "size": bundle_size,
                "annotations": {"org.opencontainers.image.title": notes["org.opencontainers.image.title"]},
            }
        ],
        "annotations": notes,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def push(bundle: Path, dest: str, options: Any) -> dict[str, Any]:
    if not dest.startswith("docker://"):
        raise OciError(f"{dest[:100]!r}: push to docker://HOST/REPO:TAG")
    ref = parse_docker_ref(dest[len("docker://") :])
    if ref.digest is not None:
        raise OciError(f"{dest[:100]}: push to a tag, not a digest")
    try:
        with bundle.open("rb") as f:
            head = BundleReader(f).read_head()
            manifest = manifest_mod.parse(head.manifest_bytes)
            h = hashlib.sha256()
            f.seek(0)
            size = 0
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise OciError(f"{bundle}: {e.strerror}") from None
    digest = "sha256:" + h.hexdigest()
    host, repo = split_host(ref.path)
    reg = Registry(host, options)
    reg.push_blob(repo, "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest(), len(EMPTY_CONFIG), EMPTY_CONFIG)
    with bundle.open("rb") as f:
        reg.push_blob(repo, digest, size, f)
    data = artifact_manifest(digest, size, bundle_annotations(manifest, bundle.name))
    tag = ref.tag or "latest"
    manifest_digest = reg.push_manifest(repo, tag, data, MANIFEST_MEDIA_TYPE)
    return {
        "reference": f"docker://{ref.path}:{tag}",
        "pinned": f"oci://{ref.path}@{manifest_digest}",
        "manifest_digest": manifest_digest,
        "bundle_digest": digest,
        "bundle_size": size,
        "bundle_version": manifest.bundle_version,
    }
