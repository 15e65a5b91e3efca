"""The MQTT layer against a real mosquitto on a random loopback port: reports
delivered in order and acknowledged to the outbox only after the broker's
PUBACK, surviving a broker outage; jobs queued while the device was offline
delivered by its persistent session; the last will when the device's process
dies; replayed jobs and a device killed between journal write and PUBACK
answered from the journal, never run twice; subscriptions made again when the
broker lost the session."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.crashpoint import ENV as CRASHPOINT_ENV
from agent.mqtt.config import load_mqtt
from agent.mqtt.journal import Journal
from agent.mqtt.link import Link
from agent.mqtt.reporter import Reporter
from agent.mqtt.schema import JobStatus, parse_report
from agent.mqtt.topics import Topics
from tests.component._mqtt_device import start_device
from tests.fakes.outbox import FakeOutbox, FakeRecord, route
from tests.fixtures.mosquitto import Mosquitto
from tests.fixtures.pki import Pki
from tests.fixtures.procs import LOOPBACK
from tests.fixtures.watcher import Watcher, until

DEVICE = "gw-1"
TOPICS = Topics.for_device(DEVICE)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def broker(mosquitto: Mosquitto) -> Mosquitto:
    return mosquitto


def operator(port: int, filters: list[str], **kwargs: Any) -> Watcher:
    """The operator's side on this broker."""
    return Watcher(LOOPBACK, port, filters, **kwargs)


@pytest.fixture
def operators() -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for op in made:
        op.close()


def mqtt(broker: Mosquitto, **extra: Any) -> dict[str, Any]:
    return {"broker": f"mqtt://127.0.0.1:{broker.port}", "device_id": DEVICE, **extra}


def job(job_id: str, kind: str = "reboot") -> bytes:
    return json.dumps({"schema": 1, "id": job_id, "type": kind, "created": "2026-05-01T12:00:00Z"}).encode()


def answers(op: Watcher, job_id: str) -> list[dict[str, Any]]:
    return [parse_report(m.payload) for m in op.on(TOPICS.job_status(job_id))]


def seqs_seen(op: Watcher) -> list[int]:
    """The records the subscriber got, in arrival order, each once (a duplicate has the same id)."""
    seen: dict[str, int] = {}
    for m in op.on(TOPICS.events):
        doc = m.json()
        seen.setdefault(doc["id"], doc["seq"])
    return list(seen.values())


def fill(outbox: FakeOutbox, count: int) -> None:
    for _ in range(count):
        outbox.append(TOPICS.events)


def link_and_reporter(broker: Mosquitto, outbox: FakeOutbox, window: int) -> tuple[Link, Reporter[FakeRecord]]:
    config = load_mqtt({**mqtt(broker), "reconnect_min": 1, "reconnect_max": 2, "report_window": window},
                       broker.directory / "agent.toml")
    link = Link(config)
    reporter: Reporter[FakeRecord] = Reporter(link, outbox, route, window=window, poll=0.2)
    return link, reporter


def test_reporter_publishes_every_record_in_order_and_acks_them_in_order(
    broker: Mosquitto, operators: list[Watcher]
) -> None:
    op = operator(broker.port, [TOPICS.events])
    operators.append(op)
    outbox = FakeOutbox()
    fill(outbox, 60)
    link, reporter = link_and_reporter(broker, outbox, window=5)
    link.start()
    reporter.start()
    try:
        until(lambda: not outbox.pending(), "the outbox to empty")
        until(lambda: len(seqs_seen(op)) == 60, "the subscriber to see 60 records")
    finally:
        reporter.stop()
        link.stop()
    assert outbox.acked == list(range(1, 61))
    assert seqs_seen(op) == list(range(1, 61))


def test_reports_not_acknowledged_by_a_stopped_broker_stay_pending_and_are_sent_after_it_restarts(
    broker: Mosquitto, operators: list[Watcher]
) -> None:
    op = operator(broker.port, [TOPICS.events], client_id="operator", persistent=True)
    operators.append(op)
    outbox = FakeOutbox()
    window = 4
    link, reporter = link_and_reporter(broker, outbox, window)
    link.start()
    reporter.start()
    try:
        fill(outbox, 20)
        reporter.wake()
        until(lambda: not outbox.pending(), "the first 20 records to be acknowledged")
        until(lambda: len(seqs_seen(op)) == 20, "the subscriber to see the first 20")

        broker.freeze()  # no PUBACK can come back from now on
        fill(outbox, 20)
        reporter.wake()
        until(lambda: reporter.in_flight() == window, "the reporter to fill its window")
        assert outbox.acked == list(range(1, 21)), "a record was acknowledged without a PUBACK"
        assert [r.seq for r in outbox.pending()] == list(range(21, 41))

        broker.restart()  # SIGTERM (woken to hear it), then up again on the same port with its database
        until(lambda: not outbox.pending(), "the rest to be acknowledged after the restart")
        until(lambda: len(seqs_seen(op)) == 40, "the subscriber to see all 40")
    finally:
        reporter.stop()
        link.stop()
    assert outbox.acked == list(range(1, 41))
    assert seqs_seen(op) == list(range(1, 41))


def test_a_record_that_can_never_be_published_is_dropped_loudly_and_does_not_block_the_rest(broker: Mosquitto) -> None:
    outbox = FakeOutbox()
    outbox.append("edge-ota/v1/devices/gw-1/events", b"x" * 10)
    poison = outbox.append("bad/#/topic", b"wildcards cannot be published")
    outbox.append("edge-ota/v1/devices/gw-1/events", b"after")
    link, reporter = link_and_reporter(broker, outbox, 2)
    link.start()
    reporter.start()
    try:
        until(lambda: not outbox.pending(), "the outbox to empty past the poison record")
    finally:
        reporter.stop()
        link.stop()
    assert reporter.undeliverable == 1
    assert outbox.acked == [1, poison.seq, 3]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_job_published_while_the_device_was_offline_arrives_when_it_reconnects(
    broker: Mosquitto, operators: list[Watcher], tmp_path: Path, protocol: str
) -> None:
    channel, _, _ = start_device(tmp_path / "dev", mqtt(broker, protocol=protocol))
    until(lambda: channel.link.ready, "the device to subscribe")
    channel.stop()

    op = operator(broker.port, [TOPICS.job_status("offline-1")])
    operators.append(op)
    op.publish(TOPICS.job("offline-1"), job("offline-1"))

    channel, sink, _ = start_device(tmp_path / "dev", mqtt(broker, protocol=protocol))
    try:
        until(lambda: sink.jobs, "the queued job to arrive")
        until(lambda: answers(op, "offline-1"), "the device's answer")
    finally:
        channel.stop()
    assert [j.id for j in sink.jobs] == ["offline-1"]
    assert answers(op, "offline-1")[-1]["status"] == "succeeded"


def test_a_replayed_job_is_answered_with_its_recorded_status_and_not_run_again(
    broker: Mosquitto, operators: list[Watcher], tmp_path: Path
) -> None:
    op = operator(broker.port, [TOPICS.job_status("j1")])
    operators.append(op)
    channel, sink, _ = start_device(tmp_path / "dev", mqtt(broker, groups=["canary"]))
    try:
        until(lambda: channel.link.ready, "the device to subscribe")
        op.publish(TOPICS.job("j1"), job("j1"))
        until(lambda: len(answers(op, "j1")) == 1, "the first answer")
        op.publish(TOPICS.group_job("canary", "j1"), job("j1"))  # the same job again, through the group
        until(lambda: len(answers(op, "j1")) == 2, "the replay's answer")
    finally:
        channel.stop()
    first, replay = answers(op, "j1")
    assert first["status"] == "succeeded"
    assert "duplicate" not in first
    assert (replay["status"], replay["duplicate"], replay["group"]) == ("succeeded", True, "canary")
    assert sink.run_ids() == ["j1"]


def test_a_job_that_breaks_the_schema_is_rejected_with_the_reason_over_the_broker(
    broker: Mosquitto, operators: list[Watcher], tmp_path: Path
) -> None:
    op = operator(broker.port, [TOPICS.job_status("bad-1")])
    operators.append(op)
    channel, sink, _ = start_device(tmp_path / "dev", mqtt(broker))
    try:
        until(lambda: channel.link.ready, "the device to subscribe")
        op.publish(TOPICS.job("bad-1"), b'{"schema": 1, "id": "bad-1", "type": "reboot", "created": "now"}')
        op.publish(TOPICS.job("bad-1"), b"{" * 20000)
        until(lambda: len(answers(op, "bad-1")) == 2, "both answers")
    finally:
        channel.stop()
    reasons = [a["reason"] for a in answers(op, "bad-1")]
    assert all(a["status"] == "rejected" for a in answers(op, "bad-1"))
    assert "created: 'now' is not an ISO 8601 time" in reasons[0]
    assert "more than the 16384 allowed" in reasons[1]
    assert sink.jobs == []


class DeviceProcess:
    def __init__(self, tmp_path: Path, broker: Mosquitto, crashpoint: str | None = None) -> None:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"state_dir": str(tmp_path / "dev"), "mqtt": mqtt(broker)}))
        env = {k: v for k, v in os.environ.items() if k != CRASHPOINT_ENV}
        if crashpoint:
            env[CRASHPOINT_ENV] = crashpoint
        self.stderr = (tmp_path / "device.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.component._mqtt_device", str(spec)], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=self.stderr)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == b"ready\n", f"device did not come up: {(tmp_path / 'device.log').read_text()[-2000:]}"

    def wait(self) -> int:
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


def test_the_last_will_marks_the_device_offline_when_its_process_is_killed(
    broker: Mosquitto, operators: list[Watcher], tmp_path: Path
) -> None:
    op = operator(broker.port, [TOPICS.presence])
    operators.append(op)
    device = DeviceProcess(tmp_path, broker)
    try:
        until(lambda: any(m.json()["online"] for m in op.on(TOPICS.presence)), "presence online")
        device.proc.kill()
        assert device.wait() == -signal.SIGKILL
        until(lambda: op.on(TOPICS.presence)[-1].json()["online"] is False, "the last will")
    finally:
        device.close()
    late = operator(broker.port, [TOPICS.presence])  # a subscriber arriving later gets it retained
    operators.append(late)
    until(lambda: late.on(TOPICS.presence), "the retained presence")
    retained = late.on(TOPICS.presence)[0]
    assert retained.retain
    assert retained.json() == {"schema": 1, "device": DEVICE, "online": False}


def test_a_clean_stop_says_offline_too(broker: Mosquitto, operators: list[Watcher], tmp_path: Path) -> None:
    op = operator(broker.port, [TOPICS.presence])
    operators.append(op)
    channel, _, _ = start_device(tmp_path / "dev", mqtt(broker))
    until(lambda: channel.link.ready, "the device to subscribe")
    channel.stop()
    until(lambda: op.on(TOPICS.presence) and op.on(TOPICS.presence)[-1].json()["online"] is False, "offline")
    assert "time" in op.on(TOPICS.presence)[-1].json()


@pytest.mark.parametrize(("crashpoint", "runs_before_restart"), [
    ("mqtt-job-journalled", []),  # journalled, never handed on: the restart hands it on, once
    ("mqtt-job-answered", ["j1"]),  # journalled and run, no PUBACK: the redelivery is absorbed
])
def test_a_device_killed_between_journal_write_and_puback_gets_the_job_again_and_runs_it_once(
    broker: Mosquitto, operators: list[Watcher], tmp_path: Path, crashpoint: str, runs_before_restart: list[str]
) -> None:
    op = operator(broker.port, [TOPICS.job_status("j1")])
    operators.append(op)
    first = DeviceProcess(tmp_path, broker, crashpoint)
    try:
        op.publish(TOPICS.job("j1"), job("j1"))
        assert first.wait() == -signal.SIGKILL
    finally:
        first.close()
    runs = tmp_path / "dev" / "runs"
    assert (runs.read_text().split() if runs.exists() else []) == runs_before_restart
    assert answers(op, "j1") == []  # it died before answering

    second = DeviceProcess(tmp_path, broker)
    try:
        until(lambda: any(a.get("duplicate") for a in answers(op, "j1")), "the redelivered job's answer")
    finally:
        second.close()
    assert runs.read_text().split() == ["j1"]
    record = Journal(tmp_path / "dev" / "mqtt-jobs.journal").get("j1")
    assert record is not None
    assert record.status is JobStatus.SUCCEEDED
    assert {a["status"] for a in answers(op, "j1")} == {"succeeded"}


def test_subscriptions_are_made_again_when_the_broker_lost_the_session(
    broker: Mosquitto, operators: list[Watcher], tmp_path: Path
) -> None:
    channel, sink, _ = start_device(tmp_path / "dev", mqtt(broker))
    try:
        until(lambda: channel.link.ready, "the device to subscribe")
        broker.kill()
        broker.database.unlink(missing_ok=True)  # the broker comes back with no memory of the device
        until(lambda: not channel.link.connected, "the device to notice")
        broker.start()
        until(lambda: channel.link.ready, "the device to reconnect and subscribe again")
        op = operator(broker.port, [TOPICS.job_status("after")])
        operators.append(op)
        op.publish(TOPICS.job("after"), job("after"))
        until(lambda: answers(op, "after"), "the answer to a job sent after the restart")
    finally:
        channel.stop()
    assert [j.id for j in sink.jobs] == ["after"]


def test_a_report_the_broker_refuses_with_a_v5_reason_code_stays_pending_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broker_pki: Pki
) -> None:
    broker = Mosquitto(tmp_path / "broker", broker_pki, acl={"plain": f"topic readwrite {TOPICS.base}/#\n"})
    broker.start()
    outbox = FakeOutbox()
    outbox.append(TOPICS.events)
    outbox.append("elsewhere/denied")  # the ACL refuses it: an MQTT 5 PUBACK with "Not authorized"
    outbox.append(TOPICS.events)
    config = load_mqtt({**mqtt(broker), "protocol": "5", "reconnect_min": 1}, broker.directory / "agent.toml")
    link = Link(config)
    reporter: Reporter[FakeRecord] = Reporter(link, outbox, route, window=4, poll=0.1, retry_delay=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="agent.mqtt.reporter"):
            link.start()
            reporter.start()
            until(lambda: caplog.text.count("broker refused report 2") >= 2, "the refusal and a retry")
        assert outbox.acked == [1]  # 3 was delivered too, but acks stay in order behind 2
        assert [r.seq for r in outbox.pending()] == [2, 3]
        assert "Not authorized" in caplog.text
    finally:
        reporter.stop()
        link.stop()
        broker.kill()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_an_oversized_job_never_reaches_the_journal(
    broker: Mosquitto, operators: list[Watcher], tmp_path: Path, protocol: str
) -> None:
    op = operator(broker.port, [TOPICS.job_status("big"), TOPICS.job_status("small")])
    operators.append(op)
    channel, sink, _ = start_device(tmp_path / "dev", mqtt(broker, protocol=protocol))
    try:
        until(lambda: channel.link.ready, "the device to subscribe")
        op.publish(TOPICS.job("big"), b" " * (1 << 20) + job("big"))
        op.publish(TOPICS.job("small"), job("small"))
        until(lambda: answers(op, "small"), "the answer to the small job sent after the big one")
    finally:
        channel.stop()
    assert [j.id for j in sink.jobs] == ["small"]
    assert channel.journal.get("big") is None
    if protocol == "5":  # the device told the broker its maximum packet size: the broker dropped it
        assert answers(op, "big") == []
    else:  # read, then refused by the 16 KiB check
        assert "more than the 16384 allowed" in answers(op, "big")[0]["reason"]


def test_after_a_restart_a_new_reporter_sends_what_the_old_one_left_unacknowledged(
    broker: Mosquitto, operators: list[Watcher]
) -> None:
    op = operator(broker.port, [TOPICS.events], client_id="operator", persistent=True)
    operators.append(op)
    outbox = FakeOutbox()  # stands for the durable outbox, which outlives the agent process
    link, reporter = link_and_reporter(broker, outbox, window=3)
    link.start()
    reporter.start()
    until(lambda: link.ready, "the link")
    broker.freeze()
    fill(outbox, 10)
    reporter.wake()
    until(lambda: reporter.in_flight() == 3, "three records handed to the frozen broker")
    reporter.stop()
    link.stop(timeout=0.5)  # the agent stops; what paho held in memory is gone with it
    assert outbox.acked == []
    broker.restart()

    link, reporter = link_and_reporter(broker, outbox, window=3)  # the agent starts again
    link.start()
    reporter.start()
    try:
        until(lambda: not outbox.pending(), "the outbox to empty")
        until(lambda: len(seqs_seen(op)) == 10, "the subscriber to see all 10")
    finally:
        reporter.stop()
        link.stop()
    assert outbox.acked == list(range(1, 11))
    assert seqs_seen(op) == list(range(1, 11))
