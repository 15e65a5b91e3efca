"""Bundles built by bundler.build.build_full read back, through the documented
trust order (header -> signature -> op table -> payload -> extents), into the
exact image; keys and keyrings; signatures by keys the device does not trust."""

from __future__ import annotations

import hashlib
import io
import random
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundler.build import BundleSpec, build_full
from bundler.format.errors import SignatureError
from bundler.format.header import HEADER_SIZE, OP_RECORD_SIZE
from bundler.format.manifest import parse
from bundler.format.ops import NO_HASH, Op, OpType
from bundler.format.reader import BundleReader
from bundler.format.signing import KeyFileError, Keyring, generate_key, key_id, load_private_key, verify
from bundler.format.writer import write_bundle

from .conftest import KeyPair, MakeBundle, SimSlot, new_key_pair, stream_install

MiB = 1 << 20


def rand(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def pattern(n: int, seed: int = 2) -> bytes:
    """Compressible but not zero: a random 4 KiB block repeated."""
    block = rand(4096, seed)
    return (block * (n // 4096 + 1))[:n]


def read_back(bundle: Path, keyring: Keyring) -> tuple[bytes, SimSlot]:
    slot = SimSlot()
    verified = stream_install(bundle.read_bytes(), keyring, slot)
    image = verified.manifest.images[0]
    assert len(slot.data) == image.size
    assert hashlib.sha256(slot.data).hexdigest() == image.sha256, "full image hash by read-back"
    return bytes(slot.data), slot


def ops_of(bundle: Path, keyring: Keyring) -> list[Op]:
    with bundle.open("rb") as f:
        reader = BundleReader(f)
        return reader.read_op_table(verify(reader.read_head(), keyring))


IMAGES: dict[str, Callable[[], bytes]] = {
    "single_byte": lambda: b"\x42",
    "single_zero_byte": lambda: b"\x00",
    "random_4k": lambda: rand(4096),
    "random_not_block_multiple": lambda: rand(10_001),
    "exactly_1_mib": lambda: rand(MiB),
    "1_mib_minus_one": lambda: rand(MiB - 1),
    "1_mib_plus_one": lambda: rand(MiB + 1),
    "zero_runs_between_data": lambda: pattern(MiB) + bytes(2 * MiB) + rand(3000) + bytes(MiB - 3000) + b"end",
    "all_zero_3_mib_plus_tail": lambda: bytes(3 * MiB + 5),
    "two_replace_chunks": lambda: pattern(5 * MiB + 77, seed=9),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_bundle_reads_back_into_the_exact_image(name: str, make_bundle: MakeBundle, signing_key: KeyPair) -> None:
    image = IMAGES[name]()
    bundle = make_bundle(image)
    rebuilt, _ = read_back(bundle, signing_key.keyring)
    assert rebuilt == image


def test_layout_offsets_follow_from_the_header(make_bundle: MakeBundle, signing_key: KeyPair) -> None:
    image = pattern(MiB) + bytes(MiB) + rand(5000)
    bundle = make_bundle(image)
    data = bundle.read_bytes()
    head = BundleReader(io.BytesIO(data)).read_head()
    h = head.header
    assert h.manifest_offset == HEADER_SIZE
    assert h.signature_offset == HEADER_SIZE + h.manifest_length
    assert h.payload_offset == h.op_table_offset + h.op_count * OP_RECORD_SIZE
    assert h.total_length == len(data)
    assert data[h.manifest_offset : h.signature_offset] == head.manifest_bytes
    assert data[h.signature_offset : h.op_table_offset] == head.signature_bytes
    ops = ops_of(bundle, signing_key.keyring)
    # every REPLACE op's payload can be cut out of the file by arithmetic alone (range requests)
    for op in ops:
        if op.type is OpType.REPLACE:
            piece = data[
                h.payload_offset + op.payload_offset : h.payload_offset + op.payload_offset + op.payload_length
            ]
            assert hashlib.sha256(piece).digest() == op.payload_sha256


def test_zero_segments_become_merged_zero_ops_without_payload(make_bundle: MakeBundle, signing_key: KeyPair) -> None:
    image = pattern(MiB) + bytes(3 * MiB) + pattern(100, seed=5)
    ops = ops_of(make_bundle(image), signing_key.keyring)
    assert [(op.type, op.dst_offset, op.dst_length) for op in ops] == [
        (OpType.REPLACE, 0, MiB),
        (OpType.ZERO, MiB, 3 * MiB),
        (OpType.REPLACE, 4 * MiB, 100),
    ]
    zero = ops[1]
    assert (zero.payload_length, zero.payload_sha256, zero.dst_sha256) == (0, NO_HASH, NO_HASH)
    assert ops[2].payload_offset == ops[0].payload_length, "payload pieces are contiguous"


def test_all_zero_image_has_empty_payload(make_bundle: MakeBundle, signing_key: KeyPair) -> None:
    bundle = make_bundle(bytes(2 * MiB))
    head = BundleReader(io.BytesIO(bundle.read_bytes())).read_head()
    assert head.header.payload_length == 0
    assert head.header.total_length == bundle.stat().st_size
    assert read_back(bundle, signing_key.keyring)[0] == bytes(2 * MiB)


def test_manifest_records_what_the_build_was_asked_for(make_bundle: MakeBundle, signing_key: KeyPair) -> None:
    image = rand(12_345)
    bundle = make_bundle(image, version="2.0.1+build.7", security_version=42, compatible="acme:gw-2", slot_class="app")
    head = BundleReader(io.BytesIO(bundle.read_bytes())).read_head()
    manifest = verify(head, signing_key.keyring).manifest
    assert (manifest.bundle_version, manifest.security_version, manifest.compatible) == (
        "2.0.1+build.7",
        42,
        "acme:gw-2",
    )
    (entry,) = manifest.images
    assert (entry.slot_class, entry.size, entry.sha256) == ("app", len(image), hashlib.sha256(image).hexdigest())
    assert entry.base_sha256 is None
    # the bytes on disk are the canonical encoding of what they decode to
    assert parse(head.manifest_bytes).encode() == head.manifest_bytes


def test_empty_image_is_refused(tmp_path: Path, signing_key: KeyPair) -> None:
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    spec = BundleSpec(image=empty, key=signing_key.private_path, version="1", security_version=0, compatible="b")
    with pytest.raises(ValueError, match="empty"):
        build_full(spec, tmp_path / "out.otab")


# --- keys and keyrings -------------------------------------------------------


def test_keygen_writes_private_key_readable_only_by_owner(tmp_path: Path) -> None:
    priv, pub = generate_key(tmp_path / "keys")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    keyring = Keyring.load(pub)
    assert list(keyring.keys) == [key_id(load_private_key(priv).public_key())]


def test_keygen_refuses_to_overwrite_a_signing_key(tmp_path: Path) -> None:
    priv, _ = generate_key(tmp_path)
    before = priv.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(tmp_path)
    assert priv.read_bytes() == before


def test_key_id_is_sha256_of_raw_public_key(signing_key: KeyPair) -> None:
    raw = signing_key.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert signing_key.key_id == hashlib.sha256(raw).digest()


def test_keyring_directory_trusts_every_pub_file(tmp_path: Path, make_bundle: MakeBundle) -> None:
    pairs = [new_key_pair(tmp_path / f"k{i}") for i in range(3)]
    ring_dir = tmp_path / "keyring"
    ring_dir.mkdir()
    for i, pair in enumerate(pairs):
        (ring_dir / f"key{i}.pub").write_bytes(pair.public_path.read_bytes())
    (ring_dir / "README").write_text("not a key, and not *.pub: ignored")
    keyring = Keyring.load(ring_dir)
    assert set(keyring.keys) == {p.key_id for p in pairs}
    image = rand(3000)
    for pair in pairs:
        bundle = make_bundle(image, key=pair)
        head = BundleReader(io.BytesIO(bundle.read_bytes())).read_head()
        assert verify(head, keyring).signer == pair.key_id
        assert read_back(bundle, keyring)[0] == image


def test_keyring_directory_without_keys_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"no \*\.pub"):
        Keyring.load(tmp_path)


def test_keyring_directory_with_a_broken_key_fails_loudly(tmp_path: Path, signing_key: KeyPair) -> None:
    (tmp_path / "good.pub").write_bytes(signing_key.public_path.read_bytes())
    (tmp_path / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFileError, match=r"broken\.pub"):
        Keyring.load(tmp_path)


def test_private_key_is_not_a_public_key(signing_key: KeyPair) -> None:
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        Keyring.load(signing_key.private_path)


def test_rejects_bundle_signed_by_unknown_key_naming_the_key_id(
    make_bundle: MakeBundle, signing_key: KeyPair, other_key: KeyPair
) -> None:
    bundle = make_bundle(rand(5000), key=other_key)
    slot = SimSlot()
    with pytest.raises(SignatureError) as excinfo:
        stream_install(bundle.read_bytes(), signing_key.keyring, slot)
    assert other_key.key_id.hex()[:16] in str(excinfo.value)
    assert str(signing_key.public_path) in str(excinfo.value), "names the keyring it looked in"
    assert slot.written == []


def test_bundle_signed_by_old_and_new_key_verifies_with_either(
    make_bundle: MakeBundle, signing_key: KeyPair, other_key: KeyPair
) -> None:
    image = pattern(MiB + 10)
    original = make_bundle(image).read_bytes()
    reader = BundleReader(io.BytesIO(original))
    verified = verify(reader.read_head(), signing_key.keyring)
    ops = reader.read_op_table(verified)
    payload = original[verified.header.payload_offset :]
    out = io.BytesIO()
    write_bundle(out, verified.manifest, ops, io.BytesIO(payload), [other_key.key, signing_key.key])
    both = out.getvalue()
    for pair in (signing_key, other_key):
        slot = SimSlot()
        assert stream_install(both, pair.keyring, slot).signer == pair.key_id
        assert bytes(slot.data) == image


# --- property ----------------------------------------------------------------

PIECE = st.tuples(st.sampled_from(["zero", "random", "pattern", "byte"]), st.integers(1, 700_000), st.integers(0, 99))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(PIECE, min_size=1, max_size=5))
def test_any_small_image_round_trips(pieces: list[tuple[str, int, int]], signing_key: KeyPair) -> None:
    parts = []
    for kind, length, seed in pieces:
        if kind == "zero":
            parts.append(bytes(length))
        elif kind == "random":
            parts.append(rand(length, seed))
        elif kind == "pattern":
            parts.append(pattern(length, seed))
        else:
            parts.append(bytes([seed + 1]) * length)
    image = b"".join(parts)
    with tempfile.TemporaryDirectory() as tmp:
        image_path = Path(tmp) / "image"
        image_path.write_bytes(image)
        spec = BundleSpec(image_path, signing_key.private_path, "1", 0, "board", level=1, threads=2)
        result = build_full(spec, Path(tmp) / "b.otab")
        rebuilt, slot = read_back(Path(tmp) / "b.otab", signing_key.keyring)
    assert rebuilt == image
    assert result.image_size == len(image)
    assert len(slot.written) == result.ops
