"""Where a container image comes from, read into an `Image`: its config and its
layers in order, each with the digest it must hash to.

References (`parse_ref`):
- `oci:DIR[:TAG]` an OCI image layout directory (`oci-layout`, `index.json`,
  `blobs/ALG/HEX`); TAG is matched against `org.opencontainers.image.ref.name`,
  and may be left out when the index holds one image;
- `docker-archive:FILE` a `docker save` / `podman save` tarball (`manifest.json`
  naming the config and the layer tarballs; the first image in it);
- `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]` a registry, read by
  `bundler.oci.registry` into a temporary layout first.

An image index (multi-platform) is narrowed to `linux` and the build host's
architecture unless a platform is given. Every manifest, index and config is
read through its digest (at most `blobs.MAX_JSON` bytes); layers are opened
lazily and verified while they are applied (`bundler.oci.apply`)."""

from __future__ import annotations

import json
import platform
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from bundler.oci.blobs import MAX_JSON, check_digest, read_json_blob, sha256_digest
from bundler.oci.errors import DigestMismatch, OciError

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MT_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_MANIFEST, MT_DOCKER_MANIFEST)
REF_NAME = "org.opencontainers.image.ref.name"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x"}
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_REPO = re.compile(r"[a-z0-9]+(?:(?:[._-]|__)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._-]|__)[a-z0-9]+)*)*")
_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](?::[0-9]{1,5})?")


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer: `digest`/`size` of the blob as stored, `diff_id` of its
    uncompressed tar (from the config), `open()` the stored bytes."""

    digest: str | None
    size: int | None
    media_type: str
    diff_id: str
    open: Callable[[], IO[bytes]]

    @property
    def name(self) -> str:
        return (self.digest or self.diff_id)[:19]


@dataclass(frozen=True, slots=True)
class Image:
    ref: str
    config: dict[str, Any]
    config_digest: str
    layers: tuple[Layer, ...]
    close: Callable[[], None] = lambda: None  # releases what the layers are read from

    @property
    def created(self) -> datetime | None:
        value = self.config.get("created")
        if not isinstance(value, str):
            return None
        # RFC 3339 as Go writes it: up to nanoseconds, which datetime cannot hold
        m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d{1,9})?(Z|[+-]\d\d:\d\d)", value.strip())
        if m is None:
            return None
        try:
            return datetime.fromisoformat(m.group(1) + m.group(2).replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Ref:
    transport: str  # "oci" | "docker-archive" | "docker"
    path: str  # directory, file, or HOST/REPO
    tag: str | None = None
    digest: str | None = None


def parse_ref(value: str) -> Ref:
    transport, sep, rest = value.partition(":")
    if not sep or not rest:
        raise OciError(f"{value[:100]!r}: use oci:DIR[:TAG], docker-archive:FILE or docker://HOST/REPO:TAG")
    if transport == "oci":
        path, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if tag and not _TAG.fullmatch(tag):
            raise OciError(f"{value[:100]!r}: {tag[:80]!r} is not a tag")
        return Ref("oci", path or rest, tag or None)
    if transport == "docker-archive":
        return Ref("docker-archive", rest)
    if transport == "docker" and rest.startswith("//"):
        return parse_docker_ref(rest[2:])
    raise OciError(f"{value[:100]!r}: unknown transport {transport[:20]!r} (oci:, docker-archive:, docker://)")


def parse_docker_ref(rest: str) -> Ref:
    """`HOST[:PORT]/REPO[:TAG]` or `HOST[:PORT]/REPO@sha256:HEX` (a host is required)."""
    host, slash, path = rest.partition("/")
    if not slash or not _HOST.fullmatch(host) or not path:
        raise OciError(f"docker://{rest[:100]}: use docker://HOST[:PORT]/REPO:TAG or HOST/REPO@sha256:...")
    digest = tag = None
    if "@" in path:
        path, _, d = path.partition("@")
        digest = check_digest(d, f"docker://{rest[:100]}")
    elif ":" in path.rsplit("/", 1)[-1]:
        path, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise OciError(f"docker://{rest[:100]}: {tag[:80]!r} is not a tag")
    if not _REPO.fullmatch(path):
        raise OciError(f"docker://{rest[:100]}: {path[:100]!r} is not a repository name")
    return Ref("docker", f"{host}/{path}", tag or (None if digest else "latest"), digest)


def host_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", _ARCH.get(machine, machine)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise OciError(f"{what}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise OciError(f"{what}: not a JSON object")
    return doc


def _descriptor(value: object, what: str) -> tuple[str, str, int]:
    if not isinstance(value, dict):
        raise OciError(f"{what}: a descriptor must be an object")
    media = value.get("mediaType", "")
    size = value.get("size")
    if not isinstance(media, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise OciError(f"{what}: descriptor needs a mediaType string and a size")
    return media, check_digest(value.get("digest"), what), size


def choose_manifest(index: dict[str, Any], what: str, tag: str | None, want: tuple[str, str] | None) -> dict[str, Any]:
    """The descriptor in `index` for `tag` (by ref-name annotation) or the only
    one; for a platform list, the one for `want` (default: linux/host arch)."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise OciError(f"{what}: no manifests")
    if tag is not None:
        named = [d for d in entries if isinstance(d, dict) and (d.get("annotations") or {}).get(REF_NAME) == tag]
        if not named:
            raise OciError(f"{what}: no image tagged {tag!r}")
        entries = named
    if len(entries) == 1:
        return dict(entries[0]) if isinstance(entries[0], dict) else {}
    os_name, arch = want or host_platform()
    matching = [
        d
        for d in entries
        if isinstance(d, dict)
        and isinstance(d.get("platform"), dict)
        and d["platform"].get("os") == os_name
        and d["platform"].get("architecture") == arch
    ]
    if len(matching) == 1:
        return dict(matching[0])
    tags = sorted({str((d.get("annotations") or {}).get(REF_NAME)) for d in entries if isinstance(d, dict)})
    raise OciError(f"{what}: {len(entries)} images and none chosen for {os_name}/{arch}; name one (tags: {tags[:8]})")


class BlobStore:
    """An OCI layout's `blobs/` directory: blobs by digest, opened for reading."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        alg, _, hexa = check_digest(digest, "blob").partition(":")
        return self.root / "blobs" / alg / hexa

    def open(self, digest: str) -> IO[bytes]:
        try:
            return self.path(digest).open("rb")
        except OSError as e:
            raise OciError(f"{self.root}: blob {digest[:19]}: {e.strerror}") from None

    def document(self, digest: str, size: int | None, what: str) -> dict[str, Any]:
        with self.open(digest) as f:
            return _json(read_json_blob(f, digest, what, size), what)


def _config_layers(
    config: dict[str, Any],
    what: str,
    descriptors: list[tuple[str, str | None, int | None]],
    opener: Callable[[int], IO[bytes]],
) -> tuple[Layer, ...]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(descriptors):
        raise OciError(f"{what}: config rootfs.diff_ids must list one digest per layer ({len(descriptors)})")
    layers = []
    for i, ((media, digest, size), diff_id) in enumerate(zip(descriptors, diff_ids, strict=True)):
        layers.append(Layer(digest, size, media, check_digest(diff_id, f"{what} diff_id {i}"), lambda i=i: opener(i)))  # type: ignore[misc]
    return tuple(layers)


def load_layout(root: Path, tag: str | None, ref: str, want: tuple[str, str] | None = None) -> Image:
    what = f"oci:{root}"
    try:
        layout = _json((root / "oci-layout").read_bytes()[:MAX_JSON], f"{what}/oci-layout")
        index_bytes = (root / "index.json").read_bytes()
    except OSError as e:
        raise OciError(f"{what}: not an OCI image layout ({e.strerror}: {e.filename})") from None
    if not str(layout.get("imageLayoutVersion", "")).startswith("1."):
        raise OciError(f"{what}: unsupported imageLayoutVersion {layout.get('imageLayoutVersion')!r}")
    if len(index_bytes) > MAX_JSON:
        raise OciError(f"{what}/index.json: larger than {MAX_JSON} bytes")
    store = BlobStore(root)
    chosen = choose_manifest(_json(index_bytes, f"{what}/index.json"), what, tag, want)
    media, digest, size = _descriptor(chosen, f"{what} index")
    for _ in range(4):  # nested indexes
        if media not in INDEX_TYPES:
            break
        chosen = choose_manifest(store.document(digest, size, f"index {digest[:19]}"), what, None, want)
        media, digest, size = _descriptor(chosen, f"{what} index")
    manifest = store.document(digest, size, f"manifest {digest[:19]}")
    return image_from_manifest(manifest, store, ref)


def image_from_manifest(manifest: dict[str, Any], store: BlobStore, ref: str) -> Image:
    what = f"{ref}: manifest"
    media = manifest.get("mediaType", MT_MANIFEST)
    if media not in MANIFEST_TYPES or manifest.get("schemaVersion") != 2:
        raise OciError(f"{what}: not an image manifest (mediaType {str(media)[:80]!r})")
    _, config_digest, config_size = _descriptor(manifest.get("config"), f"{what} config")
    config = store.document(config_digest, config_size, f"{ref}: config")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise OciError(f"{what}: layers must be a list")
    descriptors: list[tuple[str, str | None, int | None]] = []
    for i, d in enumerate(raw_layers):
        lmedia, ldigest, lsize = _descriptor(d, f"{what} layer {i}")
        descriptors.append((lmedia, ldigest, lsize))
    digests = [d[1] for d in descriptors]
    return Image(
        ref, config, config_digest, _config_layers(config, ref, descriptors, lambda i: store.open(str(digests[i])))
    )


class DockerArchive:
    """A `docker save` tarball, read in place (members by name; layer tarballs
    are streamed out of it, never extracted)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:")  # noqa: SIM115 - the layers are read from it later; see close()
        except (OSError, tarfile.TarError) as e:
            raise OciError(f"docker-archive:{path}: not a tar archive ({e})") from None

    def close(self) -> None:
        self.tar.close()

    def member(self, name: str, what: str) -> IO[bytes]:
        try:
            f = self.tar.extractfile(name)
        except KeyError:
            f = None
        if f is None:
            raise OciError(f"docker-archive:{self.path}: {what} {name[:100]!r} is not a file in the archive")
        return f

    def load(self, ref: str) -> Image:
        what = f"docker-archive:{self.path}"
        f = self.member("manifest.json", "manifest")
        raw = f.read(MAX_JSON + 1)
        if len(raw) > MAX_JSON:
            raise OciError(f"{what}: manifest.json larger than {MAX_JSON} bytes")
        try:
            entries = json.loads(raw)
        except ValueError:
            raise OciError(f"{what}: manifest.json is not valid JSON") from None
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
            raise OciError(f"{what}: manifest.json lists no image")
        entry = entries[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise OciError(f"{what}: manifest.json entry needs Config and Layers")
        if not all(isinstance(n, str) for n in layer_names):
            raise OciError(f"{what}: manifest.json Layers must be file names")
        config_bytes = self.member(config_name, "config").read(MAX_JSON + 1)
        if len(config_bytes) > MAX_JSON:
            raise OciError(f"{what}: config larger than {MAX_JSON} bytes")
        config_digest = sha256_digest(config_bytes)
        named = _digest_in_name(config_name)
        if named is not None and named != config_digest:
            raise DigestMismatch(f"{what}: config {config_name[:80]}", named, config_digest)
        config = _json(config_bytes, f"{what}: config")
        descriptors: list[tuple[str, str | None, int | None]]
        descriptors = [("", _digest_in_name(n, blob_only=True), None) for n in layer_names]
        names = [str(n) for n in layer_names]
        return Image(
            ref,
            config,
            config_digest,
            _config_layers(config, ref, descriptors, lambda i: self.member(names[i], "layer")),
        )


def _digest_in_name(name: str, *, blob_only: bool = False) -> str | None:
    """`blobs/sha256/HEX` (new docker) or `HEX.json` (configs) name their digest."""
    m = re.fullmatch(r"blobs/(sha256)/([0-9a-f]{64})", name) or (
        None if blob_only else re.fullmatch(r"(?:.*/)?()([0-9a-f]{64})\.json", name)
    )
    if m is None:
        return None
    return f"sha256:{m.group(2)}"
