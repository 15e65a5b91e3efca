"""The broker fixtures against real brokers, with paho-mqtt 2.x: every listener
of mosquitto and of a private RabbitMQ node (plain, TLS client certificate,
password) connects, acknowledges QoS 1, keeps retained messages, publishes
last wills and queues for persistent sessions; TLS without a trusted client
certificate and wrong passwords are refused; mosquitto keeps sessions and
retained messages across a restart, and so does RabbitMQ; two RabbitMQ nodes
form a cluster that routes between them.

Where RabbitMQ 3.10 differs from mosquitto (no MQTT 5, QoS 2 served as QoS 1,
retained messages only for exact-topic subscriptions and only on the node that
took the publish) a test states the difference, so the agent's broker-agnostic
suite can rely on it. The RabbitMQ node is shared by the session: every test
uses its own client ids and topics.
"""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from tests.fixtures.brokers import ClientFactory
from tests.fixtures.mosquitto import Mosquitto
from tests.fixtures.mqtt_client import MQTT5, MQTT311, Endpoint, MqttVersion, TestClient
from tests.fixtures.pki import Pki
from tests.fixtures.procs import log_count, port_accepts, wait_for_log
from tests.fixtures.rabbitmq import RabbitCluster, RabbitNode

LISTENERS = [(broker, listener) for broker in ("mosquitto", "rabbitmq") for listener in ("plain", "tls", "password")]
# RabbitMQ 3.10 speaks MQTT 3.1.1 only (test_rabbitmq_refuses_mqtt5_connect).
CASES = [
    pytest.param(broker, listener, protocol, id=f"{broker}-{listener}-{name}")
    for broker, listener in LISTENERS
    for protocol, name in ((MQTT5, "v5"), (MQTT311, "v311"))
    if protocol == MQTT311 or broker == "mosquitto"
]
BROKER_PROTOCOLS = [
    pytest.param(broker, protocol, id=f"{broker}-{name}")
    for broker in ("mosquitto", "rabbitmq")
    for protocol, name in ((MQTT5, "v5"), (MQTT311, "v311"))
    if protocol == MQTT311 or broker == "mosquitto"
]


def _endpoint(request: pytest.FixtureRequest, broker: str, listener: str) -> Endpoint:
    handle: Mosquitto | RabbitNode = request.getfixturevalue(broker)
    return handle.endpoint(listener)


def _uid() -> str:
    return secrets.token_hex(4)


def _connected(client: TestClient) -> TestClient:
    result = client.connect()
    assert result.accepted, f"{client.endpoint.name}: {result}"
    return client


@pytest.mark.parametrize(("broker", "listener", "protocol"), CASES)
def test_connects_and_qos1_publish_is_acknowledged_and_delivered(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker: str, listener: str, protocol: MqttVersion
) -> None:
    endpoint, uid = _endpoint(request, broker, listener), _uid()
    sub = _connected(mqtt_client(endpoint, f"{uid}-sub", protocol=protocol))
    pub = _connected(mqtt_client(endpoint, f"{uid}-pub", protocol=protocol))
    assert sub.subscribe(f"t/{uid}/status", qos=1) == 1

    pub.publish(f"t/{uid}/status", b'{"state":"idle"}', qos=1)  # returns only after PUBACK

    got = sub.expect()
    assert (got.topic, got.payload, got.qos, got.retain) == (f"t/{uid}/status", b'{"state":"idle"}', 1, False)


@pytest.mark.parametrize(("broker", "listener", "protocol"), CASES)
def test_retained_message_reaches_a_late_subscriber(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker: str, listener: str, protocol: MqttVersion
) -> None:
    endpoint, uid = _endpoint(request, broker, listener), _uid()
    pub = _connected(mqtt_client(endpoint, f"{uid}-pub", protocol=protocol))
    pub.publish(f"t/{uid}/state", b"online", qos=1, retain=True)
    pub.disconnect()

    late = _connected(mqtt_client(endpoint, f"{uid}-late", protocol=protocol))
    late.subscribe(f"t/{uid}/state", qos=1)

    got = late.expect()
    assert (got.topic, got.payload, got.retain) == (f"t/{uid}/state", b"online", True)


@pytest.mark.parametrize(("broker", "listener", "protocol"), CASES)
def test_last_will_is_published_when_the_socket_drops(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker: str, listener: str, protocol: MqttVersion
) -> None:
    endpoint, uid = _endpoint(request, broker, listener), _uid()
    watcher = _connected(mqtt_client(endpoint, f"{uid}-watch", protocol=protocol))
    watcher.subscribe(f"t/{uid}/will", qos=1)
    device = _connected(
        mqtt_client(endpoint, f"{uid}-dev", protocol=protocol, will=(f"t/{uid}/will", b"offline", 1, False))
    )

    device.drop()

    got = watcher.expect()
    assert (got.topic, got.payload) == (f"t/{uid}/will", b"offline")


@pytest.mark.parametrize(("broker", "listener", "protocol"), CASES)
def test_clean_disconnect_does_not_publish_the_will(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker: str, listener: str, protocol: MqttVersion
) -> None:
    endpoint, uid = _endpoint(request, broker, listener), _uid()
    watcher = _connected(mqtt_client(endpoint, f"{uid}-watch", protocol=protocol))
    watcher.subscribe(f"t/{uid}/#", qos=1)
    device = _connected(
        mqtt_client(endpoint, f"{uid}-dev", protocol=protocol, will=(f"t/{uid}/will", b"offline", 1, False))
    )

    device.disconnect()
    pub = _connected(mqtt_client(endpoint, f"{uid}-pub", protocol=protocol))
    pub.publish(f"t/{uid}/marker", b"after", qos=1)

    assert watcher.expect().topic == f"t/{uid}/marker"  # the will, had it been sent, would be first
    assert watcher.quiet_for(0.3) == []


def _persistent(mqtt_client: ClientFactory, endpoint: Endpoint, client_id: str, protocol: MqttVersion) -> TestClient:
    return mqtt_client(endpoint, client_id, protocol=protocol, clean=False, session_expiry=300)


def _queue_while_offline(mqtt_client: ClientFactory, endpoint: Endpoint, uid: str, protocol: MqttVersion) -> None:
    """A persistent session subscribes and goes away; three QoS 1 jobs are published for it."""
    device = _connected(_persistent(mqtt_client, endpoint, f"{uid}-dev", protocol))
    device.subscribe(f"t/{uid}/jobs", qos=1)
    device.disconnect()
    pub = _connected(mqtt_client(endpoint, f"{uid}-pub", protocol=protocol))
    for n in range(3):
        pub.publish(f"t/{uid}/jobs", f"job-{n}".encode(), qos=1)
    pub.disconnect()


def _receive_queued(mqtt_client: ClientFactory, endpoint: Endpoint, uid: str, protocol: MqttVersion) -> None:
    device = _persistent(mqtt_client, endpoint, f"{uid}-dev", protocol)
    result = device.connect()
    assert result.accepted
    assert result.session_present
    assert [m.payload for m in device.expect_n(3)] == [b"job-0", b"job-1", b"job-2"]


@pytest.mark.parametrize(("broker", "listener", "protocol"), CASES)
def test_persistent_session_receives_qos1_messages_published_while_offline(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker: str, listener: str, protocol: MqttVersion
) -> None:
    endpoint, uid = _endpoint(request, broker, listener), _uid()
    _queue_while_offline(mqtt_client, endpoint, uid, protocol)
    _receive_queued(mqtt_client, endpoint, uid, protocol)


@pytest.mark.parametrize("protocol", [pytest.param(MQTT5, id="v5"), pytest.param(MQTT311, id="v311")])
def test_mosquitto_keeps_sessions_and_retained_messages_across_a_restart(
    mosquitto: Mosquitto, mqtt_client: ClientFactory, protocol: MqttVersion
) -> None:
    endpoint, uid = mosquitto.endpoint("tls"), _uid()
    _queue_while_offline(mqtt_client, endpoint, uid, protocol)
    _connected(mqtt_client(endpoint, f"{uid}-ret", protocol=protocol)).publish(f"t/{uid}/r", b"kept", retain=True)
    ports = mosquitto.ports

    mosquitto.restart()

    assert mosquitto.ports == ports
    _receive_queued(mqtt_client, endpoint, uid, protocol)
    late = _connected(mqtt_client(endpoint, f"{uid}-late", protocol=protocol))
    late.subscribe(f"t/{uid}/r")
    assert late.expect().payload == b"kept"


def test_mosquitto_client_online_during_a_restart_reconnects_by_itself(
    mosquitto: Mosquitto, mqtt_client: ClientFactory
) -> None:
    endpoint, uid = mosquitto.endpoint("plain"), _uid()
    device = _connected(mqtt_client(endpoint, f"{uid}-dev", clean=False))
    device.subscribe(f"t/{uid}/jobs")

    mosquitto.restart()

    assert device.wait_connected().session_present
    _connected(mqtt_client(endpoint, f"{uid}-pub")).publish(f"t/{uid}/jobs", b"after-restart")
    assert device.expect().payload == b"after-restart"


def test_mosquitto_stop_leaves_no_listener_and_start_brings_all_back(mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    assert not mosquitto.running
    assert [port_accepts(p) for p in mosquitto.ports] == [False, False, False]

    mosquitto.start()
    assert [port_accepts(p) for p in mosquitto.ports] == [True, True, True]


# What each broker logs when it refuses the handshake (OpenSSL's and Erlang ssl's words).
TLS_REFUSAL_LOGGED = {
    ("mosquitto", "no client certificate"): "peer did not return a certificate",
    ("mosquitto", "a certificate from another CA"): "certificate verify failed",
    ("rabbitmq", "no client certificate"): "Certificate required",
    ("rabbitmq", "a certificate from another CA"): "Unknown CA",
}


@pytest.mark.parametrize("broker", ["mosquitto", "rabbitmq"])
@pytest.mark.parametrize("presented", ["no client certificate", "a certificate from another CA"])
def test_tls_listener_refuses_a_client_without_a_trusted_certificate(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker_pki: Pki, broker: str, presented: str
) -> None:
    handle: Mosquitto | RabbitNode = request.getfixturevalue(broker)
    cert = None if presented == "no client certificate" else broker_pki.foreign_client
    endpoint = dataclasses.replace(handle.endpoint("tls"), client_cert=cert)
    logged = TLS_REFUSAL_LOGGED[broker, presented]
    seen = log_count(handle.log, logged)

    result = mqtt_client(endpoint, f"{_uid()}-dev").connect()

    assert result.reason is None, f"{endpoint.name} answered CONNECT: {result}"
    assert result.error
    assert wait_for_log(handle.log, logged, after=seen), f"{endpoint.name} did not log {logged!r}"


@pytest.mark.parametrize(("broker", "protocol"), BROKER_PROTOCOLS)
def test_wrong_password_is_refused(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker: str, protocol: MqttVersion
) -> None:
    endpoint = dataclasses.replace(_endpoint(request, broker, "password"), password="wrong")

    result = mqtt_client(endpoint, f"{_uid()}-dev", protocol=protocol).connect()

    assert result.reason is not None, result
    assert result.reason.is_failure
    assert result.reason.getName() in ("Not authorized", "Bad user name or password")


def test_mosquitto_allows_anonymous_clients_only_on_the_plain_listener(
    mosquitto: Mosquitto, mqtt_client: ClientFactory
) -> None:
    anonymous = dataclasses.replace(mosquitto.endpoint("password"), username=None, password=None)

    result = mqtt_client(anonymous, f"{_uid()}-anon").connect()

    assert result.reason is not None
    assert result.reason.is_failure
    assert _connected(mqtt_client(mosquitto.endpoint("plain"), f"{_uid()}-anon")).endpoint.port == mosquitto.port


def test_rabbitmq_refuses_mqtt5_connect(rabbitmq: RabbitNode, mqtt_client: ClientFactory) -> None:
    result = mqtt_client(rabbitmq.endpoint("plain"), f"{_uid()}-v5", protocol=MQTT5).connect()

    assert result.reason is None  # no CONNACK at all: the node drops the connection
    assert not rabbitmq.endpoint("plain").can.mqtt5


@pytest.mark.parametrize("broker", ["mosquitto", "rabbitmq"])
def test_qos2_is_exactly_once_on_mosquitto_and_served_as_qos1_on_rabbitmq(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker: str
) -> None:
    endpoint, uid = _endpoint(request, broker, "plain"), _uid()
    sub = _connected(mqtt_client(endpoint, f"{uid}-sub"))
    granted = sub.subscribe(f"t/{uid}/q2", qos=2)
    _connected(mqtt_client(endpoint, f"{uid}-pub")).publish(f"t/{uid}/q2", b"once", qos=2)

    got = sub.expect()

    expected_qos = 2 if endpoint.can.qos2 else 1
    assert (granted, got.payload, got.qos) == (expected_qos, b"once", expected_qos)


@pytest.mark.parametrize("broker", ["mosquitto", "rabbitmq"])
def test_retained_messages_reach_wildcard_subscriptions_on_mosquitto_only(
    request: pytest.FixtureRequest, mqtt_client: ClientFactory, broker: str
) -> None:
    endpoint, uid = _endpoint(request, broker, "plain"), _uid()
    _connected(mqtt_client(endpoint, f"{uid}-pub")).publish(f"t/{uid}/dev1/state", b"idle", retain=True)
    late = _connected(mqtt_client(endpoint, f"{uid}-late"))

    late.subscribe(f"t/{uid}/+/state")
    late.subscribe(f"t/{uid}/dev1/state")

    copies = [late.expect(), *late.quiet_for(0.5)]
    assert {(m.topic, m.payload, m.retain) for m in copies} == {(f"t/{uid}/dev1/state", b"idle", True)}
    assert len(copies) == (2 if endpoint.can.retained_wildcards else 1)


def test_rabbitmq_keeps_sessions_and_retained_messages_across_a_restart(
    rabbitmq: RabbitNode, mqtt_client: ClientFactory
) -> None:
    endpoint, uid = rabbitmq.endpoint("plain"), _uid()
    _queue_while_offline(mqtt_client, endpoint, uid, MQTT311)
    _connected(mqtt_client(endpoint, f"{uid}-ret")).publish(f"t/{uid}/r", b"kept", retain=True)
    ports = rabbitmq.mqtt_ports

    rabbitmq.restart()

    assert rabbitmq.mqtt_ports == ports
    _receive_queued(mqtt_client, endpoint, uid, MQTT311)
    late = _connected(mqtt_client(endpoint, f"{uid}-late"))
    late.subscribe(f"t/{uid}/r")
    assert late.expect().payload == b"kept"


def test_rabbitmq_cluster_routes_between_nodes_and_keeps_retained_messages_node_local(
    rabbitmq_cluster: RabbitCluster, mqtt_client: ClientFactory
) -> None:
    seed, joined = rabbitmq_cluster.nodes
    assert seed.running_nodes() == sorted([seed.nodename, joined.nodename])
    uid = _uid()
    sub = _connected(mqtt_client(joined.endpoint("plain"), f"{uid}-sub"))
    sub.subscribe(f"t/{uid}/status")
    pub = _connected(mqtt_client(seed.endpoint("plain"), f"{uid}-pub"))

    pub.publish(f"t/{uid}/status", b"from-seed")
    pub.publish(f"t/{uid}/state", b"retained-on-seed", retain=True)

    assert sub.expect().payload == b"from-seed"
    on_seed = _connected(mqtt_client(seed.endpoint("plain"), f"{uid}-late-seed"))
    on_seed.subscribe(f"t/{uid}/state")
    assert on_seed.expect().payload == b"retained-on-seed"
    on_joined = _connected(mqtt_client(joined.endpoint("plain"), f"{uid}-late-joined"))
    on_joined.subscribe(f"t/{uid}/state")
    assert on_joined.quiet_for(0.5) == []
