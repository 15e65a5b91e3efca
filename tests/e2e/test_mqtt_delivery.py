"""Reports survive what happens to the broker and to the agent: a broker restart
in the middle of an install (the install completes, every report arrives after
the reconnect), and the agent SIGKILLed while reports were in flight to a
broker that had stopped answering (after the restart every report arrives;
a report that arrives twice is the same document with the same id). Each runs
on mosquitto and on RabbitMQ's MQTT plugin."""

from __future__ import annotations

import json
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from agent.mqtt.topics import Topics
from tests.e2e._mqtt import (
    Daemon,
    Gate,
    Watcher,
    bundle_server,
    daemons,
    job_doc,
    job_statuses,
    make_mqtt_device,
    outbox_lines,
    until,
    wait_final,
    wait_online,
)
from tests.e2e.conftest import BundleFactory, Images, KeyPair
from tests.fixtures.mqtt_client import Endpoint


class Broker(Protocol):
    """What these tests do to a broker; `Mosquitto` and `RabbitNode` both can."""

    @property
    def running(self) -> bool: ...
    def endpoint(self, listener: str) -> Endpoint: ...
    def stop(self) -> None: ...
    def start(self) -> None: ...
    def freeze(self) -> None: ...
    def thaw(self) -> None: ...


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    node: Broker = request.getfixturevalue(request.param)
    yield node
    node.thaw()  # the RabbitMQ node is shared by the session: never left frozen or stopped
    if not node.running:
        node.start()


@pytest.fixture
def topics() -> Topics:
    """A device id of its own per test: the RabbitMQ node keeps sessions across tests."""
    return Topics.for_device(f"gw-d-{secrets.token_hex(3)}")


def setup(
    tmp_path: Path, broker: Broker, topics: Topics, images: Images, key: KeyPair, bundle: Path
) -> tuple[Path, Path]:
    directory = tmp_path / "dev"
    at = broker.endpoint("plain")
    make_mqtt_device(directory, images.factory.path, key.public, f"mqtt://{at.host}:{at.port}", topics.device)
    www = tmp_path / "www"
    www.mkdir()
    (www / "v2.otab").write_bytes(bundle.read_bytes())
    return directory, www


def outbox_has(directory: Path, job_id: str, status: str) -> bool:
    return any(r["event"] == "job" and r["txn"] == job_id and r["result"] == status for r in outbox_lines(directory))


def received(watcher: Watcher, topics: Topics) -> dict[str, list[bytes]]:
    """Every outbox report the operator got (events and job states), by report id."""
    out: dict[str, list[bytes]] = {}
    for m in watcher.messages:
        if m.topic == topics.events or (m.topic.startswith(f"{topics.base}/jobs/") and m.topic.endswith("/status")):
            doc = m.json()
            if "seq" in doc:
                out.setdefault(doc["id"], []).append(m.payload)
    return out


def assert_every_record_arrived(directory: Path, watcher: Watcher, topics: Topics) -> dict[str, list[bytes]]:
    got = received(watcher, topics)
    records = outbox_lines(directory)
    missing = [r for r in records if r["id"] not in got]
    assert not missing, f"reports never delivered: {missing}"
    for rid, copies in got.items():
        assert len(set(copies)) == 1, f"report {rid} arrived as different documents: {copies}"
    seqs: dict[int, str] = {}
    for copies in got.values():
        doc: dict[str, Any] = json.loads(copies[0])
        assert seqs.setdefault(doc["seq"], doc["id"]) == doc["id"], "two reports with one seq"
    assert set(got) <= {r["id"] for r in records}, "a report the outbox never held"
    return got


def test_a_broker_restart_mid_install_loses_no_report_and_the_install_completes(
    tmp_path: Path, broker: Broker, topics: Topics, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle("2.0", security_version=2)
    directory, www = setup(tmp_path, broker, topics, images, signing_key, bundle)
    gate = Gate(after=bundle.stat().st_size // 2)
    at = broker.endpoint("plain")
    watcher = Watcher(at.host, at.port, [f"{topics.base}/#"], client_id=f"op-r-{topics.device}", persistent=True)
    daemon = Daemon(directory).start()
    with daemons(daemon), bundle_server(www, gate) as url:
        wait_online(watcher, topics, daemon)
        watcher.publish(topics.job("r-1"), job_doc("r-1", url=url("v2.otab")))
        until(lambda: "in-progress" in job_statuses(watcher, topics, "r-1"), "the job to start")
        assert gate.reached.wait(30), "the download did not start"
        broker.stop()  # the device still holds half the bundle; the broker is gone
        gate.open()
        until(lambda: outbox_has(directory, "r-1", "succeeded"), "the install, reboot and commit without a broker")
        assert not outbox_has(directory, "r-1", "failed")
        broker.start()  # same ports, same database: both sessions are still there
        final = wait_final(watcher, topics, "r-1")
        assert final["status"] == "succeeded"
        until(lambda: not [r for r in outbox_lines(directory) if r["id"] not in received(watcher, topics)],
              "every report to arrive")
    assert_every_record_arrived(directory, watcher, topics)
    assert "installed" in job_statuses(watcher, topics, "r-1")
    assert gate.requests == 1
    watcher.close()


def acked_seq(directory: Path) -> int:
    """The newest record the broker acknowledged; 0 before the first (the file is written with it)."""
    path = directory / "state" / "outbox.acked"
    return int(path.read_text()) if path.exists() else 0


def test_an_agent_killed_while_reports_are_in_flight_delivers_them_all_after_its_restart(
    tmp_path: Path, broker: Broker, topics: Topics, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle("2.0", security_version=2)
    directory, www = setup(tmp_path, broker, topics, images, signing_key, bundle)
    gate = Gate(after=bundle.stat().st_size // 2)
    at = broker.endpoint("plain")
    watcher = Watcher(at.host, at.port, [f"{topics.base}/#"], client_id=f"op-k-{topics.device}", persistent=True)
    first = Daemon(directory).start()
    with daemons(first), bundle_server(www, gate) as url:
        wait_online(watcher, topics, first)
        watcher.publish(topics.job("k-1"), job_doc("k-1", url=url("v2.otab")))
        until(lambda: "in-progress" in job_statuses(watcher, topics, "k-1"), "the job to start")
        assert gate.reached.wait(30)
        broker.freeze()  # no PUBACK comes back from here on
        gate.open()
        until(lambda: outbox_has(directory, "k-1", "succeeded"), "the job to finish on the device")
        first.kill()  # SIGKILL, with reports handed to the socket and never acknowledged
        assert first.wait() == -signal.SIGKILL
    acked = acked_seq(directory)
    newest = max(r["seq"] for r in outbox_lines(directory))
    assert acked < newest, "nothing was in flight at the kill"
    broker.thaw()  # it now reads what the dead agent had sent, PUBLISHes without their PUBACKs

    second = Daemon(directory).start()
    with daemons(second):
        until(lambda: not [r for r in outbox_lines(directory) if r["id"] not in received(watcher, topics)],
              "every report to arrive after the restart")
        until(lambda: acked_seq(directory) >= newest, "the acks")
    got = assert_every_record_arrived(directory, watcher, topics)
    assert job_statuses(watcher, topics, "k-1")[-1] == "succeeded"
    duplicates = sum(len(copies) - 1 for copies in got.values())
    # The broker read the PUBLISHes the dead agent had written before it froze and delivered
    # them; the restarted agent sent them again: the same documents, under the same ids.
    assert duplicates >= 1
    watcher.close()
