"""Shared fixtures for the unit tests: signing keys, bundles built by the real
builder, bundles assembled by hand (validly signed, deliberately odd), a
recording byte stream, and a simulated slot that a bundle is streamed into.

Everything here uses the real format code (bundler.format) and real
cryptography / zstd; nothing under test is replaced.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.build import BundleSpec, build_full
from bundler.format.apply import ExtentSource, NoSource, apply_op
from bundler.format.header import Header
from bundler.format.manifest import ImageEntry, Manifest
from bundler.format.ops import Op, OpType, pack_table
from bundler.format.reader import BundleReader
from bundler.format.signing import (
    Keyring,
    VerifiedBundle,
    generate_key,
    key_id,
    load_private_key,
    pack_signatures,
    sign,
    signature_block_length,
    verify,
)


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key: Ed25519PrivateKey
    key_id: bytes

    @property
    def keyring(self) -> Keyring:
        return Keyring.load(self.public_path)


def new_key_pair(directory: Path) -> KeyPair:
    priv, pub = generate_key(directory)
    key = load_private_key(priv)
    return KeyPair(priv, pub, key, key_id(key.public_key()))


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """The trusted key: bundles in tests are signed by it unless they say otherwise."""
    return new_key_pair(tmp_path_factory.mktemp("signing-key"))


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A valid key that no test keyring trusts."""
    return new_key_pair(tmp_path_factory.mktemp("other-key"))


MakeBundle = Callable[..., Path]


@pytest.fixture
def make_bundle(tmp_path: Path, signing_key: KeyPair) -> MakeBundle:
    """make_bundle(image_bytes, *, key=KeyPair, name=..., **BundleSpec fields) -> path of a
    bundle built by bundler.build.build_full (zstd level 3 and 2 threads unless given)."""
    counter = iter(range(1_000_000))

    def make(image: bytes, *, key: KeyPair | None = None, name: str | None = None, **spec: Any) -> Path:
        n = next(counter)
        image_path = tmp_path / f"image-{n}.img"
        image_path.write_bytes(image)
        out = tmp_path / (name or f"bundle-{n}.otab")
        fields: dict[str, Any] = {
            "version": "1.0.0",
            "security_version": 1,
            "compatible": "test-board",
            "level": 3,
            "threads": 2,
        }
        fields.update(spec)
        build_full(BundleSpec(image=image_path, key=(key or signing_key).private_path, **fields), out)
        return out

    return make


# --- hand-assembled bundles -------------------------------------------------

ANY_DIGEST = "ab" * 32


def manifest_for(
    ops: Sequence[Op],
    payload_length: int,
    *,
    size: int | None = None,
    images: tuple[ImageEntry, ...] | None = None,
    **overrides: Any,
) -> Manifest:
    """A manifest for a single image built by `ops` (size defaults to their coverage)."""
    if images is None:
        covered = size if size is not None else sum(op.dst_length for op in ops)
        images = (ImageEntry("rootfs", covered, ANY_DIGEST, 0, len(ops)),)
    fields: dict[str, Any] = {
        "bundle_version": "1.0.0",
        "security_version": 1,
        "compatible": "test-board",
        "created": datetime(2026, 1, 1, tzinfo=UTC),
        "expires": None,
        "images": images,
        "op_count": len(ops),
        "op_table_sha256": hashlib.sha256(pack_table(ops)).hexdigest(),
        "payload_length": payload_length,
    }
    fields.update(overrides)
    return Manifest(**fields)


def assemble(
    manifest: Manifest | bytes,
    ops: Sequence[Op],
    payload: bytes,
    keys: Sequence[Ed25519PrivateKey],
    *,
    header: Header | None = None,
    signatures: bytes | None = None,
) -> bytes:
    """Bundle bytes from parts, signed by `keys` over whatever header/manifest is given.
    Unlike bundler.format.writer this lets a test sign deliberately inconsistent parts."""
    manifest_bytes = manifest if isinstance(manifest, bytes) else manifest.encode()
    if header is None:
        payload_length = manifest.payload_length if isinstance(manifest, Manifest) else len(payload)
        header = Header(len(manifest_bytes), signature_block_length(len(keys)), len(ops), payload_length)
    header_bytes = header.pack()
    if signatures is None:
        signatures = pack_signatures(sign(keys, header_bytes, manifest_bytes))
    return header_bytes + manifest_bytes + signatures + pack_table(ops) + payload


@pytest.fixture
def assemble_bundle() -> Callable[..., bytes]:
    return assemble


@pytest.fixture
def bundle_manifest() -> Callable[..., Manifest]:
    return manifest_for


# --- streams and a simulated slot ------------------------------------------


class RecordingStream:
    """A readable byte stream that records every read request (how many bytes
    were asked for), so tests can prove what a reader did *not* read."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)
        self.requests: list[int] = []

    def read(self, n: int, /) -> bytes:
        self.requests.append(n)
        return self._inner.read(n)

    @property
    def requested(self) -> int:
        return sum(self.requests)


@pytest.fixture
def recording_stream() -> type[RecordingStream]:
    return RecordingStream


@dataclass
class SimSlot:
    """A slot in memory: what an installer writes, extent by extent (single-image bundles)."""

    data: bytearray = field(default_factory=bytearray)
    written: list[int] = field(default_factory=list)  # op indexes, in write order
    produced: list[int] = field(default_factory=list)  # op indexes handed to ops.produce

    def write(self, index: int, op: Op, extent: bytes) -> None:
        assert op.dst_offset == len(self.data), "extents arrive in destination order"
        self.data += extent
        self.written.append(index)


def stream_install(
    data: bytes, keyring: Keyring, slot: SimSlot, source: ExtentSource | None = None
) -> VerifiedBundle:
    """Stream bundle bytes into `slot` in the documented trust order, each op run by
    the one op-execution function (`apply.apply_op`); no read-back here."""
    reader = BundleReader(io.BytesIO(data))
    verified = verify(reader.read_head(), keyring)
    ops = reader.read_op_table(verified)
    base_size = verified.manifest.images[0].base_size or 0
    for index, op, payload in reader.iter_payload(ops):
        if op.type is not OpType.ZERO:
            slot.produced.append(index)
        extent = apply_op(op, payload, index, source or NoSource(), base_size)
        slot.write(index, op, bytes(op.dst_length) if extent is None else extent)
    return verified


@pytest.fixture
def install() -> Callable[[bytes, Keyring, SimSlot], VerifiedBundle]:
    return stream_install
