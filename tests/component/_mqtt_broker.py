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
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

LOOPBACK = "127.0.0.1"
MOSQUITTO = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Wait for a condition; the deadline only keeps a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


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


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.payload)
        return doc


class Operator:
    """The other side: a paho client that subscribes to `filters` (again on every
    connect) and keeps every message it receives."""

    def __init__(self, port: int, filters: list[str], *, client_id: str = "", persistent: bool = False,
                 auth: tuple[str, str] | None = None) -> None:
        self.filters = filters
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=not persistent, protocol=paho.MQTTv311)
        self.client.reconnect_delay_set(1, 1)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(LOOPBACK, port, keepalive=10)
        self.client.loop_start()
        until(self._subscribed.is_set, "the operator's subscription", 10)

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        if self.filters:
            client.subscribe([(f, 1) for f in self.filters])
        else:
            self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
