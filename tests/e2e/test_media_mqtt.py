"""A USB stick on a device of a fleet (a real mosquitto broker): an air-gapped
visit while the agent is not running queues the receipt, and the fleet gets it
as a `media` event when the daemon next connects; a visit while the daemon runs
is the daemon's job, so its progress (command `media`) is published on the
device's progress topic like any other job's, followed by its receipt."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.mqtt.topics import Topics
from tests.e2e._mqtt import Daemon, Watcher, daemons, make_mqtt_device, until, wait_online
from tests.e2e._sim import SimDevice
from tests.e2e._stick import assert_nothing_left_mounted, ext4_stick, loop_device, media, needs_loop
from tests.e2e.conftest import BundleFactory, Images, KeyPair
from tests.fixtures.mosquitto import Mosquitto

pytestmark = needs_loop
DEVICE = "gw-usb"
TOPICS = Topics.for_device(DEVICE)


def stick(tmp_path: Path, name: str, bundle: Path) -> Path:
    tree = tmp_path / name / "edge-ota"
    tree.mkdir(parents=True)
    shutil.copyfile(bundle, tree / bundle.name)
    return ext4_stick(tmp_path / f"{name}.img", tmp_path / name)


def media_reports(watcher: Watcher) -> list[dict[str, object]]:
    return [d for d in watcher.docs(TOPICS.events) if d.get("event") == "media"]


def test_receipts_reach_the_fleet_and_a_visit_through_the_daemon_reports_progress(
    tmp_path: Path, mosquitto: Mosquitto, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path / "dev"
    make_mqtt_device(directory, images.factory.path, signing_key.public,
                     f"mqtt://{mosquitto.host}:{mosquitto.port}", DEVICE)
    device = SimDevice(directory, capsys)
    with loop_device(stick(tmp_path, "first", make_bundle("2.0"))) as dev:
        offline = media(device, dev)  # no daemon, no network: standalone
    assert offline.returncode == 0, offline.stderr

    watcher = Watcher(mosquitto.host, mosquitto.port, [TOPICS.status, TOPICS.events, TOPICS.progress])
    daemon = Daemon(directory).start()
    try:
        with daemons(daemon):
            wait_online(watcher, TOPICS, daemon)
            until(lambda: media_reports(watcher), "the offline visit's receipt")
            [first] = media_reports(watcher)
            assert (first["result"], first["bundle_version"], first["device"]) == ("installed", "2.0", DEVICE)

            with loop_device(stick(tmp_path, "second", make_bundle("3.0", image=images.v3))) as dev:
                online = media(device, dev, "--json")
            assert online.returncode == 0, online.stderr
            until(lambda: len(media_reports(watcher)) == 2, "the second visit's receipt")
            progress = [d for d in watcher.docs(TOPICS.progress) if d.get("command") == "media"]
    finally:
        watcher.close()
    assert "3.0" in online.stdout
    assert {d["phase"] for d in progress} >= {"writing"}
    assert {d["origin"] for d in progress} == {"cli"}
    second = media_reports(watcher)[1]
    assert (second["result"], second["bundle_version"]) == ("installed", "3.0")
    assert "mounted /dev/" in daemon.log_text()
    assert_nothing_left_mounted(device)
