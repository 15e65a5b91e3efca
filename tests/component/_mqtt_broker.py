"""A real mosquitto for the MQTT layer's component tests, and an operator-side
client that records what it receives.

`Broker` runs `mosquitto -c CONFIG` on a random loopback port with persistence
in its own directory (saved every second and on SIGTERM), so persistent
sessions and retained messages survive `restart()`. `freeze()` (SIGSTOP) makes
it stop answering without closing a socket, the closest thing to a broker
that is down with the device still believing it is connected. Optional TLS
(client certificate required) and password listeners for the auth tests,
with a throwaway PKI made with `cryptography`.

Kept small on purpose; the shared broker fixtures (tests/fixtures) replace it later.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fixtures.watcher import Watcher, until

LOOPBACK = "127.0.0.1"
MOSQUITTO = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path, client_cn: str) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        return path

    def cert(cn: str, k: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
             *, ca: bool = False, san: bool = False) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(issuer).public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-ota test CA")])
    ca_cert = cert("edge-ota test CA", ca_key, ca_name, ca_key, ca=True)
    paths = Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                directory / "client.crt", directory / "client.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key, client_key = key(), key()
    paths.server_cert.write_bytes(
        cert("localhost", server_key, ca_name, ca_key, san=True).public_bytes(serialization.Encoding.PEM))
    paths.client_cert.write_bytes(
        cert(client_cn, client_key, ca_name, ca_key).public_bytes(serialization.Encoding.PEM))
    write_key(server_key, paths.server_key)
    write_key(client_key, paths.client_key)
    return paths


@dataclass
class Broker:
    directory: Path
    port: int = 0
    tls_port: int = 0
    password_port: int = 0
    pki: Pki | None = None
    password_file: Path | None = None
    acl: str = ""  # mosquitto acl_file text, for the password listener if there is one, else the plain one
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def database(self) -> Path:
        return self.directory / "mosquitto.db"

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        lines = [
            "user root" if os.geteuid() == 0 else "",
            "per_listener_settings true",
            "persistence true",
            f"persistence_location {self.directory}/",
            "autosave_interval 1",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            f"listener {self.port} {LOOPBACK}",
            "allow_anonymous true",
        ]
        if self.acl and self.password_file is None:
            lines.append(f"acl_file {self._write_acl()}")
        if self.pki is not None:
            self.tls_port = self.tls_port or free_port()
            lines += [f"listener {self.tls_port} {LOOPBACK}", "allow_anonymous false", f"cafile {self.pki.ca}",
                      f"certfile {self.pki.server_cert}", f"keyfile {self.pki.server_key}",
                      "require_certificate true", "use_identity_as_username true"]
        if self.password_file is not None:
            self.password_port = self.password_port or free_port()
            lines += [f"listener {self.password_port} {LOOPBACK}", "allow_anonymous false",
                      f"password_file {self.password_file}"]
            if self.acl:
                lines.append(f"acl_file {self._write_acl()}")
        config = self.directory / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        with (self.directory / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
        for port in (p for p in (self.port, self.tls_port, self.password_port) if p):
            until(partial(self._accepts, port), f"mosquitto to listen on {port} (log: {self.log})", 10)

    def _write_acl(self) -> Path:
        path = self.directory / "acl"
        path.write_text(self.acl)
        return path

    def _accepts(self, port: int) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its database), wait; a frozen broker is woken to hear it."""
        if self.proc is None:
            return
        self.proc.terminate()
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def Operator(
    port: int, filters: list[str], *, client_id: str = "", persistent: bool = False,
    auth: tuple[str, str] | None = None,
) -> Watcher:
    """The other side on this broker: the shared `Watcher` on the loopback port."""
    return Watcher(LOOPBACK, port, filters, client_id=client_id, persistent=persistent, auth=auth)

