"""Jobs the device must not simply run, sent to the real daemon through a real
mosquitto: a replayed job (answered from the journal, never run twice), a
malformed, an oversized and a schema-violating job (each answered "rejected"
with its one-line reason, nothing on the device changes), a job while an
install runs (answered busy with the running job's id), and a bundle the
device refuses (answered "rejected" with the installer's reason, slots and
bootloader untouched)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.topics import Topics
from tests.e2e._mqtt import (
    Daemon,
    Gate,
    Watcher,
    bundle_server,
    fingerprint,
    job_doc,
    job_statuses,
    make_mqtt_device,
    outbox_lines,
    until,
    wait_final,
    wait_online,
)
from tests.e2e.conftest import Broker, BundleFactory, Images, KeyPair

SLOTS_AND_BOOT = ("slot-A.img", "slot-B.img", "bootloader.json")


@dataclass
class Rig:
    directory: Path
    daemon: Daemon
    watcher: Watcher
    www: Path
    topics: Topics


@pytest.fixture
def rig(tmp_path: Path, any_broker: Broker, images: Images, signing_key: KeyPair) -> Iterator[Rig]:
    """A daemon on a simulated device, on mosquitto and on RabbitMQ (a device id of its own:
    the RabbitMQ node is shared by the session)."""
    device = f"gw-j{secrets.token_hex(3)}"
    topics = Topics.for_device(device)
    directory = tmp_path / "dev"
    make_mqtt_device(directory, images.factory.path, signing_key.public,
                     f"mqtt://{any_broker.host}:{any_broker.port}", device)
    www = tmp_path / "www"
    www.mkdir()
    watcher = Watcher(any_broker.host, any_broker.port, [f"{topics.base}/#"])
    daemon = Daemon(directory).start()
    try:
        wait_online(watcher, topics, daemon)
        yield Rig(directory, daemon, watcher, www, topics)
    finally:
        daemon.stop()
        watcher.close()


def answers(rig: Rig, job_id: str) -> list[dict[str, object]]:
    return rig.watcher.docs(rig.topics.job_status(job_id))


def install_events(rig: Rig, job_id: str) -> list[tuple[str, str]]:
    return [(r["event"], r["result"]) for r in outbox_lines(rig.directory)
            if r["txn"] == job_id and r["event"] == "install"]


def test_a_replayed_job_is_answered_from_the_journal_and_not_run_again(
    rig: Rig, make_bundle: BundleFactory
) -> None:
    (rig.www / "v2.otab").write_bytes(make_bundle("2.0", security_version=2).read_bytes())
    gate = Gate(after=1 << 40)  # never closes: it only counts the downloads
    with bundle_server(rig.www, gate) as url:
        doc = job_doc("replay-1", url=url("v2.otab"))
        rig.watcher.publish(rig.topics.job("replay-1"), doc)
        assert wait_final(rig.watcher, rig.topics, "replay-1")["status"] == "succeeded"
        before = fingerprint(rig.directory)
        seen = len(answers(rig, "replay-1"))
        rig.watcher.publish(rig.topics.job("replay-1"), doc)
        until(lambda: len(answers(rig, "replay-1")) > seen, "the replay's answer")
        replay = answers(rig, "replay-1")[-1]
        assert (replay["status"], replay["duplicate"]) == ("succeeded", True)
        assert gate.requests == 1, "the bundle was downloaded again"
        assert install_events(rig, "replay-1") == [("install", "started"), ("install", "ok")]
        after = fingerprint(rig.directory)
        assert {k: after[k] for k in SLOTS_AND_BOOT} == {k: before[k] for k in SLOTS_AND_BOOT}
        # A new job for the same bundle runs, finds it booted and committed, and writes nothing.
        rig.watcher.publish(rig.topics.job("replay-2"), job_doc("replay-2", url=url("v2.otab")))
        again = wait_final(rig.watcher, rig.topics, "replay-2")
    assert again["status"] == "succeeded"
    assert "already installed: the booted slot B holds these images" in str(again["reason"])
    assert job_statuses(rig.watcher, rig.topics, "replay-2")[-2:] == ["installed", "succeeded"]
    assert fingerprint(rig.directory)["bootloader.json"] == before["bootloader.json"]  # no reboot, no new trial


@pytest.mark.parametrize(("payload", "reason"), [
    (b'{"schema": 1, "id": "bad-1", "type": "install", "created": ', "job is not valid JSON"),
    (b" " * 20000 + job_doc("bad-1", url="http://127.0.0.1:1/x.otab"), "job is 20"),
    (json.dumps({"schema": 1, "id": "bad-1", "type": "install", "created": "2026-05-01T12:00:00Z",
                 "url": "http://127.0.0.1:1/x.otab", "colour": "red"}).encode(), "unknown key 'colour'"),
    (json.dumps({"schema": 1, "id": "bad-1", "type": "reboot", "created": "yesterday"}).encode(),
     "created: 'yesterday' is not an ISO 8601 time"),
], ids=["malformed", "oversized", "unknown-key", "bad-time"])
def test_a_malformed_oversized_or_schema_violating_job_is_rejected_and_changes_nothing(
    rig: Rig, payload: bytes, reason: str
) -> None:
    before = fingerprint(rig.directory)
    rig.watcher.publish(rig.topics.job("bad-1"), payload)
    until(lambda: answers(rig, "bad-1"), "the answer")
    (answer,) = answers(rig, "bad-1")
    assert answer["status"] == "rejected"
    assert reason in str(answer["reason"])
    assert fingerprint(rig.directory) == before  # slots, bootloader, state, outbox, journal
    assert not (rig.directory / "state" / "mqtt-jobs.journal").exists()
    assert rig.daemon.running


def test_a_job_while_an_install_runs_is_answered_busy_with_the_running_job_id(
    rig: Rig, make_bundle: BundleFactory
) -> None:
    bundle = make_bundle("2.0", security_version=2)
    (rig.www / "v2.otab").write_bytes(bundle.read_bytes())
    gate = Gate(after=bundle.stat().st_size // 2)
    with bundle_server(rig.www, gate) as url:
        rig.watcher.publish(rig.topics.job("long-1"), job_doc("long-1", url=url("v2.otab")))
        assert gate.reached.wait(30)
        rig.watcher.publish(rig.topics.job("second"), job_doc("second", "reboot"))
        rig.watcher.publish(rig.topics.job("third"), job_doc("third", url=url("v2.otab")))
        until(lambda: answers(rig, "second") and answers(rig, "third"), "the busy answers")
        gate.open()
        assert wait_final(rig.watcher, rig.topics, "long-1")["status"] == "succeeded"
    for job_id in ("second", "third"):
        (busy,) = answers(rig, job_id)
        assert (busy["status"], busy["running"]) == ("rejected", "long-1")
        assert busy["reason"] == "busy: job long-1 is running"
    reboots = [r for r in outbox_lines(rig.directory) if r["event"] == "reboot"]
    assert len(reboots) == 1  # long-1's own reboot; "second" never ran
    assert gate.requests == 1


def test_a_bundle_the_device_refuses_is_answered_rejected_with_the_installers_reason(
    rig: Rig, make_bundle: BundleFactory, other_key: KeyPair
) -> None:
    (rig.www / "untrusted.otab").write_bytes(make_bundle("2.0", key=other_key).read_bytes())
    (rig.www / "other-board.otab").write_bytes(make_bundle("2.0", compatible="another-board").read_bytes())
    before = fingerprint(rig.directory)
    with bundle_server(rig.www) as url:
        rig.watcher.publish(rig.topics.job("refuse-1"), job_doc("refuse-1", url=url("untrusted.otab")))
        first = wait_final(rig.watcher, rig.topics, "refuse-1")
        rig.watcher.publish(rig.topics.job("refuse-2"), job_doc("refuse-2", url=url("other-board.otab")))
        second = wait_final(rig.watcher, rig.topics, "refuse-2")
    assert first["status"] == "rejected"
    assert "none of which is in the keyring" in str(first["reason"])
    assert second["status"] == "rejected"
    assert "bundle is for compatible 'another-board'" in str(second["reason"])
    assert job_statuses(rig.watcher, rig.topics, "refuse-1")[-1] == "rejected"
    after = fingerprint(rig.directory)
    assert {k: after[k] for k in SLOTS_AND_BOOT} == {k: before[k] for k in SLOTS_AND_BOOT}


def test_a_cancel_job_stops_the_running_install_at_a_safe_point(rig: Rig, make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0", security_version=2)
    (rig.www / "v2.otab").write_bytes(bundle.read_bytes())
    gate = Gate(after=bundle.stat().st_size // 2)
    with bundle_server(rig.www, gate) as url:
        rig.watcher.publish(rig.topics.job("long-2"), job_doc("long-2", url=url("v2.otab")))
        assert gate.reached.wait(30)
        rig.watcher.publish(rig.topics.job("stop-it"), job_doc("stop-it", "cancel", target="long-2"))
        cancel = wait_final(rig.watcher, rig.topics, "stop-it")
        gate.open()
        canceled = wait_final(rig.watcher, rig.topics, "long-2")
    assert cancel["status"] == "succeeded"
    assert "cancel of job long-2 requested" in str(cancel["reason"])
    assert canceled["status"] == "canceled"
    assert "installed" not in job_statuses(rig.watcher, rig.topics, "long-2")

    def idle() -> dict[str, Any] | None:
        state: dict[str, Any] = rig.watcher.docs(rig.topics.status)[-1]["state"]
        return state if state["job"] is None else None

    until(idle, "the retained status without a running job")
    state = idle()
    assert state is not None
    assert (state["booted"], state["primary"], state["slots"]["B"]["bootable"]) == ("A", "A", False)
