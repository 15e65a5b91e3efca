"""`ota-fleet deploy --url oci://...` end to end: a real mosquitto, a real
registry (Debian's docker-registry, TLS from the test CA, basic auth) and real
daemons on simulated devices. The device resolves the reference through the
distribution API, installs, reboots into the new slot and commits; `--wait`
sees "succeeded", for a tag and for a pinned digest. With `[etc] merge` on,
the /etc conflicts reach the operator as a structured list in the job reports
(installed with `keep-local`, failed with `fail`) and in `deploy --json`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import sim
from agent.mqtt.topics import Topics
from bundler.build import BundleSpec, build_full
from bundler.cli import main as bundle_main
from bundler.fleet.cli import main as fleet_main
from tests.e2e._mqtt import Daemon, daemons, make_mqtt_device, wait_online
from tests.e2e._sim import COMPATIBLE
from tests.e2e.conftest import BundleFactory, Images, KeyPair
from tests.e2e.test_etc_kept_across_updates import ETC, etc_tree, ext4_image
from tests.fixtures.mosquitto import Mosquitto
from tests.fixtures.watcher import Watcher
from tests.oci._registry import PASSWORD, USER, Registry, running_registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry", tls=True, auth=True) as r:
        yield r


def push(registry: Registry, bundle: Path, tag: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`ota-bundle push` over TLS; the pinned oci://HOST/REPO@sha256:... reference."""
    assert registry.tls is not None
    capsys.readouterr()
    argv = ["push", str(bundle), f"docker://{registry.host}/edge/os:{tag}", "--registry-ca", str(registry.tls.ca),
            "--creds", f"{USER}:{PASSWORD}", "--json"]
    assert bundle_main(argv) == 0
    pinned: str = json.loads(capsys.readouterr().out)["pinned"]
    return pinned


def trust_registry(directory: Path, registry: Registry, extra: str = "") -> None:
    assert registry.tls is not None
    creds = directory / "registry.creds"
    creds.write_text(f"{USER}:{PASSWORD}\n")
    with sim.config_path(directory).open("a") as f:
        f.write(f'\n[download]\nca_file = "{registry.tls.ca}"\nregistry_credentials = "{creds}"\n{extra}')


def deploy(capsys: pytest.CaptureFixture[str], broker: str, *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    capsys.readouterr()
    rc = fleet_main(["--broker", broker, "deploy", *argv, "--wait", "--json", "--timeout", "120"])
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines()], err


def test_a_deploy_of_an_oci_tag_and_of_a_pinned_digest_is_followed_to_the_commit(
    tmp_path: Path, mosquitto: Mosquitto, registry: Registry, images: Images, signing_key: KeyPair,
    make_bundle: BundleFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    broker = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    directory = tmp_path / "gw-a"
    make_mqtt_device(directory, images.factory.path, signing_key.public, broker, "gw-a")
    trust_registry(directory, registry)
    push(registry, make_bundle("2.0", security_version=2), "2.0", capsys)
    pinned = push(registry, make_bundle("3.0", security_version=3, image=images.v3), "3.0", capsys)
    daemon = Daemon(directory)
    watcher = Watcher(mosquitto.host, mosquitto.port, ["edge-ota/v1/devices/+/status"])
    with daemons(daemon):
        daemon.start()
        wait_online(watcher, Topics.for_device("gw-a"), daemon)
        for url, version, slot in ((f"oci://{registry.host}/edge/os:2.0", "2.0", "B"), (pinned, "3.0", "A")):
            rc, [result], err = deploy(capsys, broker, "--device", "gw-a", "--url", url)
            assert rc == 0, f"{result}\n{err}\n{daemon.log_text()[-3000:]}"
            assert result["status"] == "succeeded"
            assert result["statuses"][-2:] == ["installed", "succeeded"]
            assert f"committed (security version now {version[0]})" in result["reason"]
            state = json.loads((directory / "state" / "state.json").read_text())
            assert state["slots"][slot]["version"] == version
            assert state["committed_security_version"] == int(version[0])
    watcher.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the agent mounts the ext4 slot")
def test_etc_conflicts_reach_the_operator_in_the_job_reports(
    tmp_path: Path, mosquitto: Mosquitto, registry: Registry, signing_key: KeyPair,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    factory = ext4_image(tmp_path / "v1", tmp_path / "v1.ext4", ETC)
    running = []
    for name, on_conflict in (("gw-keep", "keep-local"), ("gw-fail", "fail")):
        directory = tmp_path / name
        sim.init(sim.SimSpec(directory, factory, signing_key.public, COMPATIBLE, slot_size=16 << 20, mqtt=broker,
                             device_id=name))
        live = etc_tree(directory / "live-etc", ETC)
        (live / "hostname").write_text(f"{name}-17")
        defaults = etc_tree(directory / "factory-etc", ETC)
        etc = f'\n[etc]\nmerge = true\nold = "{defaults}"\ncurrent = "{live}"\non_conflict = "{on_conflict}"\n'
        trust_registry(directory, registry, etc)
        running.append(Daemon(directory))
    image = ext4_image(tmp_path / "v2", tmp_path / "v2.ext4", ETC | {"hostname": "image-name"})
    bundle = tmp_path / "v2.otab"
    build_full(BundleSpec(image=image, key=signing_key.private, version="2.0", security_version=1,
                          compatible=COMPATIBLE), bundle)
    push(registry, bundle, "2.0", capsys)
    watcher = Watcher(mosquitto.host, mosquitto.port, ["edge-ota/v1/devices/+/status",
                                                       "edge-ota/v1/devices/+/jobs/+/status"])
    with daemons(*running):
        for daemon in running:
            daemon.start()
        for daemon in running:
            wait_online(watcher, Topics.for_device(daemon.directory.name), daemon)
        rc, results, err = deploy(capsys, broker, "--device", "gw-keep", "--device", "gw-fail", "--url",
                                  f"oci://{registry.host}/edge/os:2.0")
    assert rc == 1, err  # one device failed
    by_device = {r["device"]: r for r in results}
    detail = "changed on the device and in the new image"
    keep, fail = by_device["gw-keep"], by_device["gw-fail"]
    assert (keep["status"], fail["status"]) == ("succeeded", "failed")
    assert keep["conflicts"] == [{"path": "hostname", "kind": "both-changed", "outcome": "kept-local",
                                  "detail": detail}]
    assert fail["conflicts"] == [{"path": "hostname", "kind": "both-changed", "outcome": "failed", "detail": detail}]
    assert "/etc merge: 1 conflicts: hostname" in fail["reason"]
    job = keep["job"]
    reports = {(d["device"], d["status"]): d for name in by_device
               for d in watcher.docs(Topics.for_device(name).job_status(job))}
    watcher.close()
    assert reports[("gw-keep", "installed")]["conflicts"][0]["outcome"] == "kept-local"
    assert "conflicts" not in reports[("gw-keep", "succeeded")]  # the commit itself had none
    assert reports[("gw-fail", "failed")]["conflicts"][0]["outcome"] == "failed"
