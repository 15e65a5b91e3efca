"""The same two-phase success sequence through RabbitMQ's MQTT plugin (a private
node, MQTT 3.1.1 only), driven by `ota-fleet`: `deploy --device ID --wait`
follows in-progress, installed and succeeded; `status --device ID` reads the
retained state, which RabbitMQ delivers to exact-topic subscriptions only
(the wildcard form `status` finds nothing there, as docs/mqtt.md says)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from agent.mqtt.topics import Topics
from bundler.fleet.cli import main as fleet_main
from tests.e2e._mqtt import Daemon, Watcher, bundle_server, daemons, make_mqtt_device, wait_online
from tests.e2e.conftest import BundleFactory, Images, KeyPair
from tests.fixtures.rabbitmq import RabbitNode


def test_an_install_job_through_rabbitmq_reports_installed_then_succeeded_and_status_reads_the_retained_state(
    tmp_path: Path, rabbitmq: RabbitNode, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    device = f"gw-rmq-{secrets.token_hex(3)}"  # the node is shared by the session
    topics = Topics.for_device(device)
    endpoint = rabbitmq.endpoint("plain")
    broker = f"mqtt://{endpoint.host}:{endpoint.port}"
    directory = tmp_path / "dev"
    make_mqtt_device(directory, images.factory.path, signing_key.public, broker, device)
    www = tmp_path / "www"
    www.mkdir()
    (www / "v2.otab").write_bytes(make_bundle("2.0", security_version=2).read_bytes())
    watcher = Watcher(endpoint.host, endpoint.port, [f"{topics.base}/#"])
    daemon = Daemon(directory).start()
    with daemons(daemon), bundle_server(www) as url:
        wait_online(watcher, topics, daemon)
        capsys.readouterr()
        rc = fleet_main(["--broker", broker, "deploy", "--device", device, "--url", url("v2.otab"), "--wait",
                         "--timeout", "120"])
        out, err = capsys.readouterr()
        assert rc == 0, out + err
        states = [line.split()[1] for line in out.splitlines()]
        assert states[-2:] == ["installed", "succeeded"]
        assert "in-progress" in states
        job_id = err.split("job ", 1)[1].split()[0]

        rc = fleet_main(["--broker", broker, "status", "--device", device, "--json"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        (doc,) = [json.loads(line) for line in out.splitlines()]
        assert (doc["online"], doc["booted"], doc["version"]) == (True, "B", "2.0")

        rc = fleet_main(["--broker", broker, "status"])  # wildcards: RabbitMQ 3.10 keeps retained messages back
        out, err = capsys.readouterr()
        assert (rc, out) == (1, "")
        assert "needs --device ID" in err

    job_docs = {d["id"]: d for d in watcher.docs(topics.job_status(job_id)) if "seq" in d}
    assert [d["status"] for d in sorted(job_docs.values(), key=lambda d: d["seq"])] == [
        "in-progress", "installed", "succeeded"]
    watcher.close()


def test_a_group_deploy_through_rabbitmq_waits_for_the_expected_members_and_each_commits(
    tmp_path: Path, rabbitmq: RabbitNode, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """RabbitMQ tells a wildcard subscriber no retained status, so the group's
    members are unknown to `deploy`: `--expect 2` says how many answers to wait for."""
    tag = secrets.token_hex(3)
    group, names = f"lab-{tag}", [f"gw-rg{i}-{tag}" for i in (1, 2)]
    endpoint = rabbitmq.endpoint("plain")
    broker = f"mqtt://{endpoint.host}:{endpoint.port}"
    running = []
    for name in names:
        make_mqtt_device(tmp_path / name, images.factory.path, signing_key.public, broker, name, (group,))
        running.append(Daemon(tmp_path / name))
    www = tmp_path / "www"
    www.mkdir()
    (www / "v2.otab").write_bytes(make_bundle("2.0", security_version=2).read_bytes())
    watcher = Watcher(endpoint.host, endpoint.port, [f"{Topics.for_device(n).base}/#" for n in names])
    with daemons(*running), bundle_server(www) as url:
        for daemon in running:
            daemon.start()
        for daemon, name in zip(running, names, strict=True):
            wait_online(watcher, Topics.for_device(name), daemon)
        capsys.readouterr()
        rc = fleet_main(["--broker", broker, "deploy", "--group", group, "--url", url("v2.otab"), "--wait",
                         "--expect", "2", "--timeout", "120"])
        out, err = capsys.readouterr()
        assert rc == 0, out + err
        for name in names:
            mine = [line.split()[1] for line in out.splitlines() if line.startswith(f"{name}: ")]
            assert mine[-2:] == ["installed", "succeeded"], out
        assert "2 succeeded" in err
    watcher.close()
