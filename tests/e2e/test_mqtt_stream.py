"""An install-stream deploy end to end: a simulated device daemon that reaches only
the broker (a real mosquitto) gets its bundle in chunks (`ota-fleet deploy --device
ID --file BUNDLE --wait`), under the device's credit, and the job ends "succeeded"
after the simulated reboot committed the new slot. A bundle the device refuses
(an untrusted key) ends "rejected" the same way an install job would."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.mqtt.schema import chunk_message, parse_credit
from agent.mqtt.stream import window_chunks
from agent.mqtt.topics import Topics
from bundler.fleet.cli import main as fleet_main
from tests.e2e._mqtt import (
    PREFIX,
    Daemon,
    Watcher,
    daemons,
    final_status,
    job_doc,
    make_mqtt_device,
    until,
    wait_final,
    wait_online,
)
from tests.e2e.conftest import BundleFactory, Images, KeyPair
from tests.fixtures.mosquitto import Mosquitto

DEVICE = "gw-stream"
CHUNK = 4096


def test_a_bundle_streamed_over_mqtt_under_credit_is_installed_and_committed(
    tmp_path: Path, mosquitto: Mosquitto, images: Images, signing_key: KeyPair, other_key: KeyPair,
    make_bundle: BundleFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    make_mqtt_device(tmp_path / DEVICE, images.factory.path, signing_key.public, url, DEVICE)
    daemon = Daemon(tmp_path / DEVICE)
    bundle = make_bundle("2.0", security_version=2)
    untrusted = make_bundle("3.0", key=other_key)
    credits = f"{PREFIX}/devices/{DEVICE}/jobs/+/credit"
    watcher = Watcher(mosquitto.host, mosquitto.port, [f"{PREFIX}/devices/+/status", credits])
    with daemons(daemon), _closing(watcher):
        daemon.start()
        wait_online(watcher, Topics.for_device(DEVICE), daemon)

        capsys.readouterr()
        rc = fleet_main(["--broker", url, "deploy", "--device", DEVICE, "--file", str(bundle), "--chunk-size",
                         str(CHUNK), "--wait", "--timeout", "120", "--job-id", "stream-1"])
        out, err = capsys.readouterr()
        assert rc == 0, out + err + daemon.log_text()
        states = [line.split()[1] for line in out.splitlines() if line.startswith(f"{DEVICE}: ")]
        assert states[-2:] == ["installed", "succeeded"], out
        assert "streamed in chunks of 4096" in err
        assert "1 succeeded" in err

        grants = [parse_credit(m.payload) for m in watcher.on(f"{PREFIX}/devices/{DEVICE}/jobs/stream-1/credit")]
        assert all(g is not None for g in grants)
        docs = [g for g in grants if g is not None]
        size = bundle.stat().st_size
        assert size > 4 * window_chunks(CHUNK) * CHUNK, "the bundle spans several windows"
        assert len(docs) > size // (window_chunks(CHUNK) * CHUNK)  # granted again as it was read
        assert max(d["credit"] for d in docs) <= window_chunks(CHUNK)  # never more than a window ahead
        assert docs[-1] == {"closed": True, "credit": 0, "next": size}

        rc = fleet_main(["--broker", url, "deploy", "--device", DEVICE, "--file", str(untrusted), "--wait",
                         "--json", "--timeout", "60"])
        out, err = capsys.readouterr()
        assert rc == 1
        result = json.loads(out.splitlines()[-1])
        assert result["status"] == "rejected", out
        assert "signature" in result["reason"].lower() or "key" in result["reason"].lower(), result


@contextlib.contextmanager
def _closing(watcher: Watcher) -> Iterator[None]:
    try:
        yield
    finally:
        watcher.close()


def test_a_stream_with_the_wrong_hash_or_that_stalls_fails_and_the_device_stays_on_its_slot(
    tmp_path: Path, mosquitto: Mosquitto, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
) -> None:
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    config = make_mqtt_device(tmp_path / DEVICE, images.factory.path, signing_key.public, url, DEVICE)
    config.write_text(config.read_text() + "\n[download]\nstall_bytes = 1\nstall_seconds = 2\n")
    daemon = Daemon(tmp_path / DEVICE)
    data = make_bundle("2.0", security_version=2).read_bytes()
    topics = Topics.for_device(DEVICE)
    watcher = Watcher(mosquitto.host, mosquitto.port, [f"{PREFIX}/devices/+/status", f"{topics.base}/jobs/+/credit",
                                                       f"{topics.base}/jobs/+/status"])
    with daemons(daemon), _closing(watcher):
        daemon.start()
        wait_online(watcher, topics, daemon)

        # the right size, a wrong digest: every chunk is sent as credit allows
        watcher.publish(topics.job("bad-hash"), job_doc("bad-hash", "install-stream", size=len(data),
                                                        sha256="0" * 64, chunk_size=CHUNK))
        sent = 0
        while final_status(watcher, topics, "bad-hash") is None:
            grants = [g for m in watcher.on(topics.credit("bad-hash")) if (g := parse_credit(m.payload))]
            limit = max((g["next"] + g["credit"] * CHUNK for g in grants), default=0)
            if sent < min(limit, len(data)):
                watcher.publish(topics.chunks("bad-hash"), chunk_message(sent, data[sent : sent + CHUNK]))
                sent += CHUNK
            else:
                seen = len(watcher.on(topics.credit("bad-hash")))
                until(lambda: len(watcher.on(topics.credit("bad-hash"))) > seen  # noqa: B023 (used at once)
                      or final_status(watcher, topics, "bad-hash"), "more credit or the end", 60)
        doc = wait_final(watcher, topics, "bad-hash")
        assert doc["status"] == "failed", doc
        assert "not the job's 0000" in doc["reason"]

        # nothing is ever sent: the [download] stall limit ends it
        watcher.publish(topics.job("stalled"), job_doc("stalled", "install-stream", size=len(data),
                                                       sha256="1" * 64, chunk_size=CHUNK))
        doc = wait_final(watcher, topics, "stalled")
        assert doc["status"] == "failed", doc
        assert "stalled: fewer than 1 bytes in 2 s after 0 bytes" in doc["reason"]
        resent = [parse_credit(m.payload) for m in watcher.on(topics.credit("stalled"))]
        assert resent[0] == {"credit": window_chunks(CHUNK), "next": 0}
        assert resent[-1] == {"closed": True, "credit": 0, "next": 0}

        status = watcher.docs(topics.status)[-1]
        assert status["state"]["booted"] == "A", status
    assert daemon.stop() == 0


def test_deploy_file_needs_exactly_one_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "b.otab"
    bundle.write_bytes(b"x")
    rc = fleet_main(["--broker", "mqtt://127.0.0.1:1", "deploy", "--group", "lab", "--file", str(bundle)])
    assert rc != 0
    assert "--file streams the bundle to one device over the broker" in capsys.readouterr().err
