"""`ota-fleet` against three simulated devices, each its own real daemon, through
one real mosquitto: a group deploy followed to the end (`deploy --group G
--wait`: every device's state changes live, exit 0 once all committed), the
fleet's last known state from the retained topics (`status`), and a deploy of
a bundle the devices refuse (exit 1, one JSON object per device)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.topics import Topics
from bundler.fleet.cli import main as fleet_main
from tests.e2e._mqtt import Daemon, Watcher, bundle_server, daemons, make_mqtt_device, wait_online
from tests.e2e.conftest import BundleFactory, Images, KeyPair
from tests.fixtures.mosquitto import Mosquitto

DEVICES = ("gw-a", "gw-b", "gw-c")


def fleet(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = fleet_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_group_deploy_is_followed_to_the_commit_on_every_member_and_status_shows_the_fleet(
    tmp_path: Path, mosquitto: Mosquitto, images: Images, signing_key: KeyPair, other_key: KeyPair,
    make_bundle: BundleFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    running = []
    for name in DEVICES:
        make_mqtt_device(tmp_path / name, images.factory.path, signing_key.public, url, name, ("lab",))
        running.append(Daemon(tmp_path / name))
    www = tmp_path / "www"
    www.mkdir()
    (www / "v2.otab").write_bytes(make_bundle("2.0", security_version=2).read_bytes())
    (www / "untrusted.otab").write_bytes(make_bundle("3.0", key=other_key).read_bytes())
    watcher = Watcher(mosquitto.host, mosquitto.port, ["edge-ota/v1/devices/+/status"])
    with daemons(*running), bundle_server(www) as bundle_url:
        for daemon in running:
            daemon.start()
        for daemon, name in zip(running, DEVICES, strict=True):
            wait_online(watcher, Topics.for_device(name), daemon)

        rc, out, err = fleet(capsys, "--broker", url, "deploy", "--group", "lab", "--url", bundle_url("v2.otab"),
                             "--wait", "--timeout", "120")
        assert rc == 0, out + err
        lines = out.splitlines()
        for name in DEVICES:
            mine = [line for line in lines if line.startswith(f"{name}: ")]
            assert [line.split()[1] for line in mine][-2:] == ["installed", "succeeded"], out
            assert sum(" succeeded" in line for line in mine) == 1
            assert "committed (security version now 2)" in mine[-1]
        assert "3 succeeded" in err

        rc, out, err = fleet(capsys, "--broker", url, "status", "--json")
        assert rc == 0, err
        docs = {d["device"]: d for d in map(json.loads, out.splitlines())}
        assert sorted(docs) == list(DEVICES)
        for doc in docs.values():
            assert (doc["online"], doc["booted"], doc["version"], doc["groups"]) == (True, "B", "2.0", ["lab"])
            assert doc["last_result"]["event"] == "commit"
        rc, out, err = fleet(capsys, "--broker", url, "status", "--device", "gw-b", "--device", "gw-nobody")
        assert rc == 1
        assert out.splitlines()[0].startswith("gw-b  online  booted B  version 2.0  idle  last: commit ok")
        assert "gw-nobody" in out
        assert "no retained status for gw-nobody" in err

        rc, out, err = fleet(capsys, "--broker", url, "deploy", "--device", "gw-a", "--device", "gw-c", "--url",
                             bundle_url("untrusted.otab"), "--wait", "--json", "--timeout", "60")
        assert rc == 1
        results: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
        assert sorted(r["device"] for r in results) == ["gw-a", "gw-c"]
        for r in results:
            assert (r["status"], r["final"], r["timed_out"]) == ("rejected", True, False)
            assert "none of which is in the keyring" in r["reason"]
    watcher.close()
