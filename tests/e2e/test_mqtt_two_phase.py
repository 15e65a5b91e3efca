"""The two-phase truth over MQTT, observed by an operator's subscriber: the real
daemon (`ota-agent run`) on a simulated device takes an install job from a
real mosquitto, reports in-progress (with progress), then "installed" once the
image is written and read back, reboots (the simulated power cycle, done by
the daemon in-process), and reports "succeeded" only after boot-check
committed the new slot, or "rolled-back" with the reason when the device went
back: a failing health check, or a hang that the watchdog resets until the
bootloader falls back. The success and health-check sequences run on both
mosquitto and RabbitMQ's MQTT plugin (3.1.1), each test with its own device id
since the RabbitMQ node is shared by the session."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path
from typing import Any

from agent.mqtt.schema import parse_report
from agent.mqtt.topics import Topics
from tests.e2e._mqtt import (
    Daemon,
    Watcher,
    bundle_server,
    daemons,
    edit_config,
    job_doc,
    job_statuses,
    make_mqtt_device,
    outbox_lines,
    until,
    wait_final,
    wait_online,
)
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import Broker, BundleFactory, Images, KeyPair
from tests.fixtures.mosquitto import Mosquitto

DEVICE = "gw-1"
TOPICS = Topics.for_device(DEVICE)


def watch(broker: Mosquitto | Broker, topics: Topics = TOPICS) -> Watcher:
    return Watcher(broker.host, broker.port, [f"{topics.base}/#"])


def seq_statuses(watcher: Watcher, job_id: str, topics: Topics = TOPICS) -> list[str]:
    """The statuses the outbox reported for a job, in `seq` order (each report once)."""
    docs = {d["id"]: d for d in watcher.docs(topics.job_status(job_id)) if "seq" in d}
    return [d["status"] for d in sorted(docs.values(), key=lambda d: d["seq"])]


def device_setup(
    tmp_path: Path, broker: Mosquitto | Broker, images: Images, key: KeyPair, device: str = DEVICE
) -> Path:
    directory = tmp_path / "dev"
    make_mqtt_device(directory, images.factory.path, key.public, f"mqtt://{broker.host}:{broker.port}", device)
    return directory


def install(tmp_path: Path, bundle: Path) -> tuple[Path, str]:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "v2.otab").write_bytes(bundle.read_bytes())
    return www, "v2.otab"


def test_an_install_job_reports_installed_then_succeeded_only_after_the_new_slot_committed(
    tmp_path: Path, any_broker: Broker, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
    capsys: Any,
) -> None:
    device = f"gw-{secrets.token_hex(3)}"
    topics = Topics.for_device(device)
    directory = device_setup(tmp_path, any_broker, images, signing_key, device)
    www, name = install(tmp_path, make_bundle("2.0", security_version=2))
    watcher = watch(any_broker, topics)
    daemon = Daemon(directory).start()
    with daemons(daemon), bundle_server(www) as url:
        wait_online(watcher, topics, daemon)
        watcher.publish(topics.job("rollout-1"), job_doc("rollout-1", url=url(name)))
        final = wait_final(watcher, topics, "rollout-1")
        assert final["status"] == "succeeded", final
        until(lambda: any(d["state"]["booted"] == "B" for d in watcher.docs(topics.status)), "the status of B")
    assert "committed (security version now 2)" in final["reason"]
    # The outbox's reports, in order: never "succeeded" before "installed".
    assert seq_statuses(watcher, "rollout-1", topics) == ["in-progress", "installed", "succeeded"]
    arrival = job_statuses(watcher, topics, "rollout-1")
    assert arrival.index("installed") < arrival.index("succeeded")
    assert arrival[0] in ("queued", "in-progress")  # the immediate answer
    for message in watcher.on(topics.job_status("rollout-1")):
        assert parse_report(message.payload)["device"] == device
    installed = next(d for d in watcher.docs(topics.job_status("rollout-1")) if d["status"] == "installed")
    assert "written to slot B and read back" in installed["reason"]
    assert installed["details"] == {"bundle_version": "2.0", "slot": "B"}
    # Progress reached the operator through its own topic, not the outbox.
    phases = {d["phase"] for d in watcher.docs(topics.progress)}
    assert {"writing", "verifying read-back"} <= phases
    assert all(d["job"] == "rollout-1" for d in watcher.docs(topics.progress))
    assert not any(r["event"] == "progress" for r in outbox_lines(directory))
    # The events behind it, with the job id as their txn.
    events = [(d["event"], d["result"]) for d in watcher.docs(topics.events) if d.get("txn") == "rollout-1"]
    assert ("install", "ok") in events
    assert ("commit", "ok") in events
    # The retained status says what the device runs now.
    state = watcher.docs(topics.status)[-1]["state"]
    assert (state["booted"], state["slots"]["B"]["version"], state["slots"]["B"]["boot_state"]) == ("B", "2.0", "good")
    dev = SimDevice(directory, capsys)
    assert dev.status()["committed_security_version"] == 2


def test_a_failing_health_check_is_reported_rolled_back_with_the_checks_reason(
    tmp_path: Path, any_broker: Broker, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
    capsys: Any,
) -> None:
    device = f"gw-{secrets.token_hex(3)}"
    topics = Topics.for_device(device)
    directory = device_setup(tmp_path, any_broker, images, signing_key, device)
    edit_config(directory, "deadline = 30\ncommands = []", 'deadline = 1\ncommands = [["false"]]')
    www, name = install(tmp_path, make_bundle("2.0", security_version=2))
    watcher = watch(any_broker, topics)
    daemon = Daemon(directory).start()
    with daemons(daemon), bundle_server(www) as url:
        wait_online(watcher, topics, daemon)
        watcher.publish(topics.job("rollout-2"), job_doc("rollout-2", url=url(name)))
        final = wait_final(watcher, topics, "rollout-2")
    assert final["status"] == "rolled-back", final
    assert "failed its health checks" in final["reason"]
    assert "health check `false`" in final["reason"]
    assert seq_statuses(watcher, "rollout-2", topics) == ["in-progress", "installed", "rolled-back"]
    status = SimDevice(directory, capsys).status()
    assert (status["booted"], status["slots"]["B"]["boot_state"]) == ("A", "bad")
    assert status["committed_security_version"] == 0


def test_a_hang_after_the_reboot_is_reset_by_the_watchdog_and_reported_rolled_back_after_the_restart(
    tmp_path: Path, mosquitto: Mosquitto, images: Images, signing_key: KeyPair, make_bundle: BundleFactory,
    capsys: Any,
) -> None:
    """A hang cannot happen inside the daemon's in-process power cycle: the simulated system
    that hangs is the daemon itself. So this device reboots the way real hardware does: the
    reboot command ends the daemon (SIGKILL, as a reset would), the test plays the board
    (`ota-agent sim boot --health hang`: the trial boot hangs, the simulated watchdog resets
    it until the boot counter runs out and the bootloader falls back), and then starts the
    daemon again, which settles the installed job from what boot-check recorded."""
    directory = device_setup(tmp_path, mosquitto, images, signing_key)
    reboot = f'reboot_command = ["ota-agent", "sim", "boot", "{directory.resolve()}"]'
    edit_config(directory, reboot, 'reboot_command = ["sh", "-c", "kill -KILL $PPID"]')
    www, name = install(tmp_path, make_bundle("2.0", security_version=2))
    watcher = watch(mosquitto)
    first = Daemon(directory).start()
    with daemons(first), bundle_server(www) as url:
        wait_online(watcher, TOPICS, first)
        watcher.publish(TOPICS.job("rollout-3"), job_doc("rollout-3", url=url(name)))
        assert first.wait() == -signal.SIGKILL  # the "reboot"
    assert "succeeded" not in job_statuses(watcher, TOPICS, "rollout-3")

    dev = SimDevice(directory, capsys)
    run = dev.boot(health="hang")
    assert [line.split()[3] for line in run.out.splitlines() if line.startswith("boot ")] == ["B", "B", "B", "A"]

    second = Daemon(directory).start()
    with daemons(second):
        final = wait_final(watcher, TOPICS, "rollout-3")
    assert final["status"] == "rolled-back", final
    assert "hung and was reset by the watchdog" in final["reason"]
    assert seq_statuses(watcher, "rollout-3") == ["in-progress", "installed", "rolled-back"]
    assert dev.status()["booted"] == "A"
