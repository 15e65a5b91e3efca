"""Signatures: Ed25519 keys, the signature block, and the one function that
turns an unverified bundle head into a `VerifiedBundle`.

The signed message is a fixed domain prefix, then the 64-byte header, then the
manifest bytes — so the header's lengths and the manifest (which pins the op
table hash, which pins every payload piece) are all covered. Verification
happens before any manifest field is parsed.

Signature block: u16 count (1..16), then per signature 100 bytes:
u8 algorithm (1 = Ed25519), 3 reserved zero bytes, 32-byte key id
(SHA-256 of the raw public key), 64-byte signature.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bundler.format import manifest as manifest_mod
from bundler.format.errors import FormatError, SignatureError
from bundler.format.header import Header
from bundler.format.manifest import Manifest
from ota_common.errors import OtaError

DOMAIN = b"edge-ota bundle signature v1\x00"
ALG_ED25519 = 1
ENTRY = struct.Struct("<B3s32s64s")
MAX_SIGNATURES = 16
MAX_KEY_FILE = 16 * 1024
MAX_KEYRING_FILES = 256


class KeyFileError(OtaError):
    """A key file is missing, unreadable or not an Ed25519 key."""


def key_id(public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True, slots=True)
class Signature:
    key_id: bytes
    signature: bytes
    algorithm: int = ALG_ED25519


def signature_block_length(count: int) -> int:
    return 2 + count * ENTRY.size


def pack_signatures(signatures: Sequence[Signature]) -> bytes:
    out = struct.pack("<H", len(signatures))
    for s in signatures:
        out += ENTRY.pack(s.algorithm, bytes(3), s.key_id, s.signature)
    return out


def unpack_signatures(raw: bytes) -> list[Signature]:
    if len(raw) < 2:
        raise FormatError("signature block shorter than its count", region="signatures")
    (count,) = struct.unpack_from("<H", raw)
    if not 1 <= count <= MAX_SIGNATURES:
        raise FormatError(f"signature count {count} outside [1, {MAX_SIGNATURES}]", region="signatures")
    if len(raw) != signature_block_length(count):
        raise FormatError(
            f"signature block is {len(raw)} bytes, {count} signatures need {signature_block_length(count)}",
            region="signatures",
        )
    out = []
    for i in range(count):
        alg, reserved, kid, sig = ENTRY.unpack_from(raw, 2 + i * ENTRY.size)
        if reserved != bytes(3):
            raise FormatError(f"signature {i}: reserved bytes are not zero", region="signatures")
        out.append(Signature(kid, sig, alg))
    return out


def signed_message(header: bytes, manifest: bytes) -> bytes:
    return DOMAIN + header + manifest


def sign(keys: Sequence[Ed25519PrivateKey], header: bytes, manifest: bytes) -> list[Signature]:
    message = signed_message(header, manifest)
    return [Signature(key_id(k.public_key()), k.sign(message)) for k in keys]


# --- keys -----------------------------------------------------------------


def generate_key(directory: Path) -> tuple[Path, Path]:
    """Write DIR/signing.key (PEM PKCS#8, mode 0600) and DIR/signing.pub (PEM SPKI)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv = directory / "signing.key"
    pub = directory / "signing.pub"
    if priv.exists():
        raise KeyFileError(f"{priv} already exists; refusing to overwrite a signing key")
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        pkcs8 = serialization.PrivateFormat.PKCS8
        f.write(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path}: not a PEM private key without password ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def _read_key_file(path: Path) -> bytes:
    """A key file's bytes. Only a regular file is read (a symlink to one is fine):
    a FIFO, device, socket or directory is refused before it can block or act."""
    try:
        what = _not_regular(os.stat(path).st_mode)  # before opening: opening a device can act
        if what is not None:
            raise KeyFileError(f"{path}: is {what}, not a regular key file")
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY), "rb") as f:
            what = _not_regular(os.fstat(f.fileno()).st_mode)  # swapped since the stat
            if what is not None:
                raise KeyFileError(f"{path}: is {what}, not a regular key file")
            fcntl.fcntl(f.fileno(), fcntl.F_SETFL, fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & ~os.O_NONBLOCK)
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key: {e.strerror}") from None
    except ValueError as e:  # a NUL in the path
        raise KeyFileError(f"{path!r}: cannot read key: {e}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE} bytes, not a key")
    return data


@dataclass(frozen=True, slots=True)
class Keyring:
    keys: dict[bytes, Ed25519PublicKey]
    source: str

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """A `.pub` file, or a directory whose `*.pub` files are all trusted."""
        if path.is_dir():
            files = sorted(path.glob("*.pub"))[: MAX_KEYRING_FILES + 1]
            if len(files) > MAX_KEYRING_FILES:
                raise KeyFileError(f"{path}: more than {MAX_KEYRING_FILES} keys in keyring")
        else:
            files = [path]
        if not files:
            raise KeyFileError(f"{path}: keyring directory holds no *.pub file")
        keys = {}
        for f in files:
            k = load_public_key(f)
            keys[key_id(k)] = k
        return cls(keys, str(path))


# --- verification ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnverifiedBundle:
    """Header, manifest and signature bytes as read; nothing in them is trusted yet."""

    header: Header
    header_bytes: bytes
    manifest_bytes: bytes
    signature_bytes: bytes


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """A bundle head whose signature checked out against the keyring, and whose
    manifest agrees with the header. Only `verify()` makes these."""

    header: Header
    manifest: Manifest
    signer: bytes  # key id of the trusted key that verified


def verify(bundle: UnverifiedBundle, keyring: Keyring) -> VerifiedBundle:
    signatures = unpack_signatures(bundle.signature_bytes)
    message = signed_message(bundle.header_bytes, bundle.manifest_bytes)
    known = [s for s in signatures if s.key_id in keyring.keys]
    if not known:
        ids = ", ".join(s.key_id.hex()[:16] for s in signatures)
        raise SignatureError(f"bundle is signed by key(s) {ids}, none of which is in the keyring {keyring.source}")
    for s in known:
        if s.algorithm != ALG_ED25519:
            continue
        try:
            keyring.keys[s.key_id].verify(s.signature, message)
        except InvalidSignature:
            continue
        parsed = manifest_mod.parse(bundle.manifest_bytes)
        _check_agreement(bundle.header, parsed)
        return VerifiedBundle(bundle.header, parsed, s.key_id)
    raise SignatureError("signature does not match the bundle's header and manifest (tampered or corrupt)")


def _check_agreement(header: Header, m: Manifest) -> None:
    if header.op_count != m.op_count:
        raise FormatError(f"header says {header.op_count} ops, manifest {m.op_count}", region="manifest")
    if header.payload_length != m.payload_length:
        raise FormatError(
            f"header says payload of {header.payload_length} bytes, manifest {m.payload_length}", region="manifest"
        )
    for i, image in enumerate(m.images):
        if image.op_first + image.op_count > m.op_count:
            raise FormatError(f"image {i} references ops beyond the op table", region="manifest")
