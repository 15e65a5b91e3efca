"""Installing over HTTPS: a real TLS server on loopback (Python's `ssl`, a test CA
and server certificate made with `cryptography`). The install goes through when
the client trusts the CA, given as the source's TLS context or through the
system store's `SSL_CERT_FILE`; an untrusted certificate or a host name the
certificate does not name is one clear line and changes nothing."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.daemon import build_device
from agent.installer import install
from agent.sources import HttpSource
from tests.e2e._hostile import assert_refused
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("edge-ota test CA"))
        .issuer_name(_name("edge-ota test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(d / "ca.pem", d / "server.pem", d / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pki


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class HttpsServer:
    root: Path
    port: int

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}/{name}"


@pytest.fixture
def https_server(tmp_path: Path, pki: Pki) -> Iterator[HttpsServer]:
    root = tmp_path / "www-tls"
    root.mkdir()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield HttpsServer(root, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _publish(server: HttpsServer, bundle: Path) -> str:
    (server.root / bundle.name).write_bytes(bundle.read_bytes())
    return bundle.name


def _assert_installed(device: SimDevice) -> None:
    doc = device.status()
    assert (doc["primary"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "trial", "2.0")


def test_installs_over_https_trusting_the_test_ca_through_the_tls_context(
    device: SimDevice, make_bundle: BundleFactory, https_server: HttpsServer, pki: Pki
) -> None:
    name = _publish(https_server, make_bundle("2.0"))
    agent = build_device(device.config)
    context = ssl.create_default_context(cafile=str(pki.ca))
    with HttpSource(https_server.url(name), agent.config.download, tls=context).open() as stream:
        outcome = install(agent, stream)
    assert (outcome.bundle_version, outcome.slot) == ("2.0", "B")
    _assert_installed(device)


def test_cli_installs_over_https_with_the_ca_in_the_system_store(
    device: SimDevice,
    make_bundle: BundleFactory,
    https_server: HttpsServer,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))  # what the system store reads first
    name = _publish(https_server, make_bundle("2.0"))
    device.install_ok(https_server.url(name))
    _assert_installed(device)


def test_an_untrusted_server_certificate_is_one_clear_error_and_changes_nothing(
    device: SimDevice, make_bundle: BundleFactory, https_server: HttpsServer
) -> None:
    name = _publish(https_server, make_bundle("2.0"))
    before = device.snapshot()
    assert_refused(device, before, https_server.url(name), "TLS: server certificate not trusted")


def test_a_host_name_the_certificate_does_not_name_is_refused(
    device: SimDevice,
    make_bundle: BundleFactory,
    https_server: HttpsServer,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    name = _publish(https_server, make_bundle("2.0"))
    before = device.snapshot()
    line = assert_refused(device, before, https_server.url(name, host="localhost"), "TLS: server certificate not")
    assert "localhost" in line
