"""The device identity: a private key made on the device, its CSR and certificate.

Owns the files `key.pem` (PKCS#8 PEM, mode 0600: created once, with
`atomic_write`, and never regenerated, printed, logged or returned), `csr.pem`
(a PKCS#10 request, subject CN = the device id, signed by that key),
`cert.pem` (the device certificate, when a factory CA signed the CSR) and
`ca.pem` (the factory CA certificate the device certificate must chain to), all
in the provisioning directory. What leaves this module is public: the public
key's SHA-256 fingerprint (of its DER SubjectPublicKeyInfo), the CSR, and
whether a certificate is installed.

A certificate is accepted only for this device's own key and id, within its
validity period, and issued by the factory CA certificate when one is given
(or was given before).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.crashpoint import crashpoint
from agent.errors import InstallError
from ota_common.fsutil import atomic_write, make_dirs, read_regular
from ota_common.text import clean

if TYPE_CHECKING:
    # X.509 (some 40 modules) is imported where a certificate or CSR is handled: every
    # command's start-up imports this module (the command table), an install included.
    from cryptography import x509

KEY_FILE = "key.pem"
CSR_FILE = "csr.pem"
CERT_FILE = "cert.pem"
CA_FILE = "ca.pem"
MAX_PEM = 64 * 1024
B64_PREFIX = "base64:"
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class IdentityError(InstallError):
    """The device identity cannot be made, read or completed as asked."""


@dataclass(frozen=True, slots=True)
class Identity:
    device_id: str
    key_type: str
    fingerprint: str  # SHA-256 of the public key's DER SubjectPublicKeyInfo, hex
    csr: str  # PEM
    certificate: bool
    created: bool  # the key was made by this call

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "key_type": self.key_type, "public_key_sha256": self.fingerprint,
                "csr": self.csr, "certificate": self.certificate, "key_created": self.created}

    def text(self) -> str:
        made = "made" if self.created else "kept"
        cert = "certificate installed" if self.certificate else "no certificate yet (CSR ready)"
        return f"device {self.device_id}: {self.key_type} key {made}, SHA-256 {self.fingerprint}; {cert}"


def check_device_id(value: str) -> str:
    if not DEVICE_ID.fullmatch(value):
        raise IdentityError(f"device id {clean(value, 80)!r} must be 1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return value


def fingerprint(key: PrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def default_device_id(key: PrivateKey) -> str:
    return f"dev-{fingerprint(key)[:16]}"


def _generate(key_type: str) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise IdentityError(f"unknown key type {clean(key_type, 40)!r} (ed25519 or p256)")


def _key_type(key: PrivateKey) -> str:
    return "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "p256"


def _read(path: Path, what: str) -> bytes:
    try:
        data = read_regular(path, MAX_PEM + 1)
    except OSError as e:
        raise IdentityError(f"cannot read the {what} {path}: {e.strerror}") from None
    if len(data) > MAX_PEM:
        raise IdentityError(f"the {what} {path} is larger than {MAX_PEM} bytes")
    return data


def load_or_create_key(directory: Path, key_type: str) -> tuple[PrivateKey, bool]:
    """The device key; made (and made durable) only when none exists. An existing
    key is never replaced, whatever `key_type` says now."""
    path = directory / KEY_FILE
    if path.exists() or path.is_symlink():
        if os.stat(path, follow_symlinks=False).st_mode & 0o077:
            raise IdentityError(f"{path} is readable by others than its owner; refusing to use it (chmod 600)")
        try:
            key = serialization.load_pem_private_key(_read(path, "device key"), password=None)
        except ValueError:
            raise IdentityError(f"{path} does not hold a PEM private key; it is left as it is") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{path} holds a key that is neither Ed25519 nor an EC key")
        return key, False
    key = _generate(key_type)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    make_dirs(directory, 0o700)
    atomic_write(path, pem, mode=0o600)
    crashpoint("provision-after-key")
    return key, True


def make_csr(key: PrivateKey, device_id: str) -> str:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def pem_text(value: str, what: str) -> bytes:
    """A certificate given as PEM text, as ``base64:`` and its DER in base64 (one
    word: what a console line can carry), or as a path to a PEM file (the CLI)."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    if value.startswith(B64_PREFIX):
        from cryptography import x509  # noqa: PLC0415

        try:
            der = base64.b64decode(value[len(B64_PREFIX):], validate=True)
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        except (ValueError, binascii.Error):
            raise IdentityError(f"the {what} after {B64_PREFIX!r} is not a base64 DER certificate") from None
    return _read(Path(value), what)


def _load_cert(data: bytes, what: str) -> x509.Certificate:
    from cryptography import x509  # noqa: PLC0415

    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise IdentityError(f"the {what} is not a PEM X.509 certificate") from None


def check_certificate(cert: x509.Certificate, key: PrivateKey, device_id: str,
                      ca: x509.Certificate | None, now: datetime) -> None:
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    ours = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise IdentityError("the certificate is for another key, not this device's")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise IdentityError(f"the certificate names {clean(names, 80)}, not device {device_id}")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise IdentityError(f"the certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                            f"{cert.not_valid_after_utc:%Y-%m-%d})")
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise IdentityError("the certificate was not issued by the factory CA certificate") from None


def ensure_identity(
    directory: Path,
    *,
    key_type: str,
    device_id: str | None,
    known_id: str | None,
    cert: str | None = None,
    ca_cert: str | None = None,
    now: datetime,
) -> Identity:
    """The device's identity, made where missing: key, CSR, and (when given) the
    certificate and CA. `known_id` is the id recorded earlier: another id is refused."""
    if device_id is not None:
        check_device_id(device_id)
    if known_id is not None and device_id is not None and device_id != known_id:
        raise IdentityError(f"this device's identity was made for device {known_id}; it is never remade "
                            f"(asked for {clean(device_id, 64)})")
    key, created = load_or_create_key(directory, key_type)
    ident = known_id or device_id or default_device_id(key)
    csr = make_csr(key, ident)
    csr_path = directory / CSR_FILE
    if not csr_path.exists() or _csr_subject(_read(csr_path, "CSR")) != ident:
        atomic_write(csr_path, csr.encode(), mode=0o644)
    else:
        csr = _read(csr_path, "CSR").decode()
    ca = None
    if ca_cert is not None:
        ca_pem = pem_text(ca_cert, "factory CA certificate")
        ca = _load_cert(ca_pem, "factory CA certificate")
    elif (directory / CA_FILE).exists():
        ca = _load_cert(_read(directory / CA_FILE, "factory CA certificate"), "factory CA certificate")
    if cert is not None:
        cert_pem = pem_text(cert, "device certificate")
        check_certificate(_load_cert(cert_pem, "device certificate"), key, ident, ca, now)
        if ca_cert is not None and ca is not None:
            atomic_write(directory / CA_FILE, ca.public_bytes(serialization.Encoding.PEM), mode=0o644)
        atomic_write(directory / CERT_FILE, cert_pem, mode=0o644)
    elif ca_cert is not None and ca is not None:
        atomic_write(directory / CA_FILE, ca.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return Identity(ident, _key_type(key), fingerprint(key), csr, (directory / CERT_FILE).exists(), created)


def _csr_subject(data: bytes) -> str | None:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        return None
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
