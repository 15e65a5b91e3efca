"""A console command while an MQTT-triggered install runs, in the real daemon
(`ota-agent run` with `[mqtt]` on a real mosquitto and `[console] ports` on a pty):
the install is held mid-download at a gate; on the console `status` and
`progress` show the running job and how far it is, a state-changing command is
answered "busy" at once naming the MQTT job, with its progress, and runs nothing;
the install then finishes as if the console had not been there."""

from __future__ import annotations

import secrets
from pathlib import Path

from agent.mqtt.topics import Topics
from tests.e2e._console import Pty, Technician, add_console
from tests.e2e._mqtt import (
    Daemon,
    Gate,
    Watcher,
    bundle_server,
    daemons,
    job_doc,
    make_mqtt_device,
    outbox_lines,
    wait_final,
    wait_online,
)
from tests.e2e.conftest import BundleFactory, Images, KeyPair
from tests.fixtures.mosquitto import Mosquitto


def test_the_console_answers_busy_with_progress_while_an_mqtt_install_runs(
        tmp_path: Path, mosquitto: Mosquitto, images: Images, signing_key: KeyPair,
        make_bundle: BundleFactory) -> None:
    device = f"gw-c{secrets.token_hex(3)}"
    topics = Topics.for_device(device)
    directory = tmp_path / "dev"
    config = make_mqtt_device(directory, images.factory.path, signing_key.public,
                              f"mqtt://{mosquitto.host}:{mosquitto.port}", device)
    pty = Pty.open()
    add_console(config, pty.path)
    www = tmp_path / "www"
    www.mkdir()
    bundle = make_bundle("2.0", security_version=2)
    (www / "v2.otab").write_bytes(bundle.read_bytes())
    gate = Gate(after=bundle.stat().st_size // 2)
    watcher = Watcher(mosquitto.host, mosquitto.port, [f"{topics.base}/#"])
    daemon = Daemon(directory)
    try:
        with daemons(daemon), bundle_server(www, gate) as url:
            daemon.start()
            wait_online(watcher, topics, daemon)
            tech = Technician(pty.master)
            tech.wait_ready()
            tech.line("json on")
            tech.reply("json")
            watcher.publish(topics.job("long-1"), job_doc("long-1", url=url("v2.otab")))
            assert gate.reached.wait(30)
            _until_progress(tech)

            tech.line("status")
            status = tech.reply("status")["result"]
            assert status["job"]["id"] == "long-1"
            assert status["job"]["origin"] == "mqtt"
            tech.line("reboot")
            busy = tech.reply("reboot")
            assert busy["ok"] is False
            assert busy["error"]["type"] == "BusyError"
            assert busy["error"]["message"].startswith("busy: job long-1 (install) is running")
            assert busy["job"]["id"] == "long-1"
            assert "long-1 (install) in-progress" in busy["progress"]
            assert "confirm" not in busy  # refused before any question
            tech.line("json off")
            tech.quiet(0.3)
            tech.line("mark-bad A")
            assert tech.expect(r"^error: busy: job long-1 \(install\) is running")

            gate.open()
            assert wait_final(watcher, topics, "long-1")["status"] == "succeeded"
    finally:
        watcher.close()
        pty.close()
    events = [r["event"] for r in outbox_lines(directory)]
    assert events.count("reboot") == 1  # long-1's own reboot; the console's never ran
    assert "mark-bad" not in events


def _until_progress(tech: Technician) -> None:
    """`progress` until it shows the MQTT job with bytes done."""
    for _ in range(100):
        tech.line("progress")
        doc = tech.reply("progress")
        job = doc["result"]["job"]
        if job and job["progress"] and job["progress"]["done"] > 0:
            assert job["id"] == "long-1"
            assert doc["text"].startswith("job long-1 (install) in-progress: ")
            return
        tech.quiet(0.1)
    raise AssertionError("the console never saw the install's progress")
