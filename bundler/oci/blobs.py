"""Content-addressed blobs: digest strings (`sha256:<hex>`, `sha512:<hex>`),
a reader that hashes what passes through and fails at the end when the bytes
do not match their digest or their declared size, and the decompression of
layer media types (tar, gzip, zstd) as a bounded stream.

Nothing here trusts a blob before its last byte was hashed: callers stage what
they read somewhere disposable and keep it only when `VerifyingReader` reached
the end without raising."""

from __future__ import annotations

import gzip
import hashlib
import re
from typing import IO, Protocol

import zstandard

from bundler.oci.errors import DigestMismatch, OciError

CHUNK = 1 << 20
MAX_JSON = 4 << 20  # manifests, indexes, configs: small documents
_DIGEST = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")

TAR_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def check_digest(value: object, what: str) -> str:
    """A digest string as the image spec writes it; anything else is refused."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise OciError(f"{what}: {str(value)[:80]!r} is not a sha256/sha512 digest")
    return value


def hasher(digest: str) -> hashlib._Hash:
    return hashlib.new(digest.split(":", 1)[0])


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class VerifyingReader:
    """`read(n)` over `raw`, hashing every byte; at the end (or on `finish()`),
    the hash and the byte count must match `digest` and `size` (None: unknown)."""

    def __init__(self, raw: Readable, digest: str | None, what: str, size: int | None = None) -> None:
        self._raw = raw
        self.digest = digest  # None: only counted (a docker archive names only the uncompressed digest)
        self.what = what
        self.size = size
        self._hash = hasher(digest or "sha256:")
        self.count = 0
        self.done = False

    def read(self, n: int = -1, /) -> bytes:
        if self.done:
            return b""
        if n is None or n < 0:
            n = CHUNK
        if self.size is not None:
            n = min(n, self.size - self.count + 1)
        data = self._raw.read(n)
        self.count += len(data)
        if self.size is not None and self.count > self.size:
            raise OciError(f"{self.what}: more than the {self.size} bytes its descriptor declares")
        self._hash.update(data)
        if not data:
            self._end()
        return data

    def _end(self) -> None:
        self.done = True
        if self.size is not None and self.count != self.size:
            raise OciError(f"{self.what}: {self.count} bytes, its descriptor declares {self.size}")
        if self.digest is None:
            return
        actual = f"{self.digest.split(':', 1)[0]}:{self._hash.hexdigest()}"
        if actual != self.digest:
            raise DigestMismatch(self.what, self.digest, actual)

    def finish(self) -> None:
        """Read whatever is left (a tar reader stops at its end marker) and check."""
        while not self.done:
            self.read(CHUNK)


def read_json_blob(raw: Readable, digest: str, what: str, size: int | None = None) -> bytes:
    """A small document, verified: at most MAX_JSON bytes."""
    if size is not None and size > MAX_JSON:
        raise OciError(f"{what}: {size} bytes is too large for a manifest or config (limit {MAX_JSON})")
    reader = VerifyingReader(raw, digest, what, size)
    parts = []
    total = 0
    while not reader.done:
        data = reader.read(CHUNK)
        total += len(data)
        if total > MAX_JSON:
            raise OciError(f"{what}: larger than {MAX_JSON} bytes")
        parts.append(data)
    return b"".join(parts)


def compression_of(media_type: str, head: bytes) -> str:
    """ "" (plain tar), "gzip" or "zstd": from the media type, or from the magic
    bytes when the type does not say (docker archives)."""
    if media_type in TAR_TYPES:
        return TAR_TYPES[media_type]
    if media_type:
        raise OciError(f"layer media type {media_type[:100]!r} is not a tar layer this tool can apply")
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return ""


def decompressed(raw: IO[bytes], kind: str) -> IO[bytes]:
    """A streaming decompressor over `raw`; memory stays bounded by the codec's window."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(raw, read_across_frames=True)
    return raw
