"""The station's factory CA: signs device CSRs into device certificates.

Owns checking a CSR a device sent (its own signature valid, subject CN a
device id, an Ed25519 or P-256 key) and issuing a certificate for it with the
CA key and certificate the station holds. The device checks the certificate
again when it installs it (public key, CN, validity, issuer); a station never
sees a device's private key. `make_ca` creates a self-signed CA for labs and
tests; a real factory's CA comes from its PKI.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ota_common.errors import OtaError
from ota_common.text import clean

MAX_PEM = 64 * 1024
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_DAYS = 3650

CaKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class CaError(OtaError):
    """The CA cannot be loaded, or a CSR cannot be signed."""


@dataclass(frozen=True)
class FactoryCa:
    key: CaKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Issued:
    device_id: str
    fingerprint: str  # SHA-256 of the device public key's DER SubjectPublicKeyInfo
    cert_pem: str


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaError(f"cannot read the {what} {path}: {e.strerror}") from None
    if len(data) > MAX_PEM:
        raise CaError(f"the {what} {path} is larger than {MAX_PEM} bytes")
    return data


def load_ca(key_path: Path, cert_path: Path) -> FactoryCa:
    try:
        key = serialization.load_pem_private_key(_read(key_path, "CA key"), password=None)
    except (ValueError, TypeError) as e:
        raise CaError(f"{key_path} is not an unencrypted PEM private key: {clean(e, 100)}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise CaError(f"{key_path}: the CA key must be Ed25519 or EC")
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path, "CA certificate"))
    except ValueError:
        raise CaError(f"{cert_path} is not a PEM X.509 certificate") from None
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub != cert.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CaError(f"{cert_path} is not the certificate of the key {key_path}")
    return FactoryCa(key, cert)


def _algorithm(key: CaKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def make_ca(directory: Path, name: str = "edge-ota factory CA", *, days: int = DEFAULT_DAYS) -> tuple[Path, Path]:
    """A self-signed Ed25519 CA (key mode 0600) for a lab or a test: (key path, cert path)."""
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, None)
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / "ca.key", directory / "ca.pem"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def sign_csr(ca: FactoryCa, csr_pem: str, *, days: int = DEFAULT_DAYS, now: datetime | None = None) -> Issued:
    """A device certificate for a CSR a device sent (untrusted until checked here)."""
    if len(csr_pem) > MAX_PEM:
        raise CaError(f"the CSR is larger than {MAX_PEM} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise CaError("the device sent something that is not a PEM certificate request") from None
    if not csr.is_signature_valid:
        raise CaError("the CSR's signature does not verify (not made with the key it names)")
    pub = csr.public_key()
    if not isinstance(pub, ed25519.Ed25519PublicKey) and not (
        isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    ):
        raise CaError("the CSR's key is neither Ed25519 nor P-256")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    device_id = str(names[0].value) if len(names) == 1 else ""
    if not DEVICE_ID.fullmatch(device_id):
        raise CaError(f"the CSR's subject {clean(csr.subject.rfc4514_string(), 80)!r} is not CN=<device id>")
    now = now or datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca.cert.subject).public_key(pub).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, _algorithm(ca.key))
    )
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Issued(device_id, hashlib.sha256(der).hexdigest(), cert.public_bytes(serialization.Encoding.PEM).decode())
