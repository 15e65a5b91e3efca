"""The link's security set-up against real mosquitto listeners: TLS with the
broker's CA and a client certificate (required by the broker), and
username/password from a password file; a wrong password or an unknown CA
never connects, and the reason is logged as one line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.config import load_mqtt
from agent.mqtt.link import Link
from agent.mqtt.schema import parse_report
from agent.mqtt.topics import Topics
from tests.component._mqtt_device import start_device
from tests.fixtures.mosquitto import Mosquitto, mosquitto_binary
from tests.fixtures.pki import make_pki
from tests.fixtures.procs import LOOPBACK
from tests.fixtures.watcher import Watcher, until

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (make test installs it)")

DEVICE = "gw-7"


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    directory = tmp_path_factory.mktemp("secure")
    broker = Mosquitto(directory / "broker", make_pki(directory / "pki", DEVICE), username=DEVICE,
                       password="right-pass")
    broker.start()
    yield broker
    broker.stop()


def link(directory: Path, **table: Any) -> Link:
    directory.mkdir(parents=True, exist_ok=True)
    return Link(load_mqtt({"device_id": DEVICE, "reconnect_min": 1, "reconnect_max": 2, **table},
                          directory / "agent.toml"))


def connects(lk: Link) -> bool:
    lk.start()
    try:
        until(lambda: lk.ready, "the link to connect and subscribe", 20)
        return True
    finally:
        lk.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_tls_with_the_brokers_ca_and_a_client_certificate_connects(
    secure_broker: Mosquitto, tmp_path: Path, protocol: str
) -> None:
    pki = secure_broker.pki
    assert connects(link(tmp_path, broker=f"mqtts://127.0.0.1:{secure_broker.tls_port}", protocol=protocol,
                         ca=str(pki.ca), cert=str(pki.client.cert), key=str(pki.client.key)))


def test_a_password_from_the_password_file_connects(secure_broker: Mosquitto, tmp_path: Path) -> None:
    (tmp_path / "pass").write_text("right-pass\n")  # the trailing newline an editor adds is not part of it
    assert connects(link(tmp_path, broker=f"mqtt://127.0.0.1:{secure_broker.password_port}", username=DEVICE,
                         password_file="pass"))


def test_a_wrong_password_is_refused_and_logged(
    secure_broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "pass").write_text("wrong-pass")
    lk = link(tmp_path, broker=f"mqtt://127.0.0.1:{secure_broker.password_port}", username=DEVICE,
              password_file="pass")
    with caplog.at_level(logging.ERROR, logger="agent.mqtt.link"):
        lk.start()
        try:
            until(lambda: "refused the connection: Not authorized" in caplog.text, "the refusal to be logged", 20)
        finally:
            lk.stop()
    assert not lk.connected


def test_a_broker_certificate_from_an_unknown_ca_is_not_trusted(
    secure_broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_pki(tmp_path / "other", DEVICE)
    lk = link(tmp_path, broker=f"mqtts://127.0.0.1:{secure_broker.tls_port}", ca=str(other.ca),
              cert=str(other.client.cert), key=str(other.client.key))
    with caplog.at_level(logging.WARNING, logger="agent.mqtt.link"):
        lk.start()
        try:
            until(lambda: "certificate verify failed" in caplog.text, "the failed verification to be logged", 20)
        finally:
            lk.stop()
    assert not lk.connected
    line = next(r.getMessage() for r in caplog.records if "certificate verify failed" in r.getMessage())
    assert line.startswith(f"mqtt: cannot connect to mqtts://127.0.0.1:{secure_broker.tls_port}: ")


def documented_acl() -> str:
    """The mosquitto ACL docs/mqtt.md recommends, exactly as written there."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "mqtt.md").read_text()
    start = text.index("# /etc/mosquitto/edge-ota.acl")
    return text[start : text.index("```", start)]


def test_the_documented_acl_lets_a_device_do_its_job_and_nothing_of_another_device(tmp_path: Path) -> None:
    users = {user: f"{user}-pass" for user in ("gw-1", "gw-2", "operator")}
    broker = Mosquitto(tmp_path / "broker", make_pki(tmp_path / "pki"), users=users,
                       acl={"password": documented_acl()})
    broker.start()
    topics = Topics.for_device("gw-1")
    port = broker.password_port
    ops: list[Watcher] = []
    try:
        op = Watcher(LOOPBACK, port, [topics.job_status("j1"), topics.job_status("j2"), topics.presence],
                      auth=("operator", "operator-pass"))
        ops.append(op)
        (tmp_path / "pass").write_text("gw-1-pass")
        channel, sink, _ = start_device(tmp_path / "dev", {
            "broker": f"mqtt://127.0.0.1:{port}", "device_id": "gw-1", "groups": ["canary"],
            "username": "gw-1", "password_file": str(tmp_path / "pass")})
        try:
            until(lambda: channel.link.ready, "the device to connect and subscribe")
            op.publish(topics.group_job("canary", "j1"), json.dumps(
                {"schema": 1, "id": "j1", "type": "reboot", "created": "2026-05-01T12:00:00Z"}).encode())
            until(lambda: op.on(topics.job_status("j1")), "the device's answer through the ACL")
            # another device may not speak for gw-1: mosquitto drops its publish silently
            rogue = Watcher(LOOPBACK, port, [], client_id="gw-2", auth=("gw-2", "gw-2-pass"))
            ops.append(rogue)
            rogue.publish(topics.job_status("j1"), b'{"forged": true}')
            rogue.publish(topics.job("j2"), b"{}")
            op.publish(topics.job("j3"), json.dumps(
                {"schema": 1, "id": "j3", "type": "status", "created": "2026-05-01T12:00:00Z"}).encode())
            until(lambda: [j.id for j in sink.jobs] == ["j1", "j3"], "the operator's second job")
        finally:
            channel.stop()
        assert [parse_report(m.payload)["status"] for m in op.on(topics.job_status("j1"))] == ["succeeded"]
        assert op.on(topics.job_status("j2")) == []  # the rogue's job never reached the device
        assert any(m.json()["online"] for m in op.on(topics.presence))
    finally:
        for o in ops:
            o.close()
        broker.stop()
