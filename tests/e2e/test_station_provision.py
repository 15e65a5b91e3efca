"""`ota-fleet provision` over pty pairs: the station drives simulated blank devices
through their serial consoles (each device's console served over its own `App`,
as `ota-agent run` serves it), one worker per port. One device and four at once
end provisioned with a certificate from the station's factory CA, the bundle
uploaded over the console; the factory log has one line per device; a wrong
bundle is refused before anything is written; a second run is refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.crashpoint import ENV as CRASHPOINT_ENV
from bundler.console.link import DeviceLink
from bundler.fleet.cli import main as fleet_main
from bundler.fleet.provision_ca import make_ca
from hw.bootloader import model
from tests.e2e._console import Relay, add_console, served
from tests.e2e._factory import REPO, BlankDevice
from tests.e2e._sim import COMPATIBLE
from tests.e2e.conftest import BundleFactory, Images, KeyPair


@contextlib.contextmanager
def station_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair,
                    n: int) -> Iterator[list[tuple[BlankDevice, Port]]]:
    """`n` blank devices, each serving its console on one end of a pty relay (a
    serial cable); the station opens the other end."""
    with contextlib.ExitStack() as stack:
        out = []
        for i in range(n):
            relay = Relay()
            stack.callback(relay.close)
            dev = BlankDevice(tmp_path / f"device{i}", capsys, backend="uboot" if i % 2 else "grub",
                              keyring=signing_key.public, compatible=COMPATIBLE)
            add_console(dev.config, relay.device.path, idle_timeout=60.0)
            stack.enter_context(served(dev.config))
            out.append((dev, Port(relay.host.path)))
        yield out


@dataclass(frozen=True)
class Port:
    path: str  # the station's end of the cable


def station(*argv: str) -> int:
    return fleet_main(["provision", *argv])


def log_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("n", [1, 4])
def test_the_station_provisions_devices_in_parallel_with_certificates_from_its_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, make_bundle: BundleFactory,
    images: Images, n: int,
) -> None:
    ca_key, ca_cert = make_ca(tmp_path / "ca")
    bundle = make_bundle("1.0", image=images.v2)
    log = tmp_path / "factory.jsonl"
    with station_devices(tmp_path, capsys, signing_key, n) as devices:
        ports = [a for _, pty in devices for a in ("--port", pty.path)]
        ids = [a for i in range(n) for a in ("--device-id", f"line1-{i:03d}")]
        rc = station(*ports, *ids, "--bundle", str(bundle), "--ca", str(ca_key), "--ca-cert", str(ca_cert),
                     "--broker", "mqtts://broker.example:8883", "--log", str(log), "--timeout", "20")
        err = capsys.readouterr()
        assert rc == 0, err
        assert f"provisioned {n} of {n} device(s)" in err.out
        records = log_lines(log)
        assert len(records) == n
        by_port = {r["port"]: r for r in records}  # in the order the devices finished
        for dev, port in devices:
            rec = by_port[port.path]
            assert rec["result"] == "provisioned"
            assert rec["uploaded"] is True
            assert rec["certificate"] is True
            assert rec["image_sha256"] == images.v2.sha256
            assert rec["image_version"] == "1.0"
            assert rec["public_key_sha256"] == dev.record["public_key_sha256"]
            assert rec["device_id"] == dev.record["device_id"]
            assert set(rec["phases_s"]) == {"connect", "identity", "config", "image"}  # type: ignore[arg-type]
            for b in ("A", "B"):
                assert dev.slot_sha256(b, images.v2.size) == images.v2.sha256
            assert dev.boot_state() == model.BootState.initial(("A", "B"))
            cfg = config_mod.load(dev.device_config)
            assert cfg.mqtt is not None
            assert cfg.mqtt.cert is not None
        assert {r["device_id"] for r in records} == {f"line1-{i:03d}" for i in range(n)}
        assert err.err.count(": provisioned line1-") == n  # a progress line per port
        # The same devices again: refused, each one line in the log, non-zero exit.
        assert station(*ports, "--bundle", str(bundle), "--log", str(log), "--timeout", "20") == 1
        again = log_lines(log)[n:]
        assert all(r["result"] == "failed" and "already provisioned" in str(r["reason"]) for r in again)


def test_a_bundle_for_another_board_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, make_bundle: BundleFactory,
) -> None:
    log = tmp_path / "factory.jsonl"
    with station_devices(tmp_path, capsys, signing_key, 1) as devices:
        dev, pty = devices[0]
        before = dev.tree()
        rc = station("--port", pty.path, "--bundle", str(make_bundle("1.0", compatible="someone-elses-board")),
                     "--log", str(log), "--timeout", "20")
        assert rc == 1
        (rec,) = log_lines(log)
        assert rec["result"] == "failed"
        assert "refused, nothing written" in str(rec["reason"])
        after = dev.tree()
        assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)} <= {"state/outbox.log"}
        assert not (dev.dir / "provision").exists()


class DeviceProcess:
    """A blank device whose console is served by `ota-agent console` in a child
    process (so it can die at a named crash point), on one end of a pty relay."""

    def __init__(self, dev: BlankDevice, relay: Relay) -> None:
        self.dev, self.relay = dev, relay
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, crashpoint: str | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop(CRASHPOINT_ENV, None)
        if crashpoint:
            env[CRASHPOINT_ENV] = crashpoint
        cmd = [sys.executable, "-m", "agent.cli", "-c", str(self.dev.config), "console", "--port",
               self.relay.device.path]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        link = DeviceLink(self.relay.host.path, timeout=30.0)  # until its console answers (start-up takes a while)
        link.open()
        link.close()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.mark.parametrize("point", ["provision-after-key", "mid-payload", "provision-after-image"])
def test_a_device_killed_at_a_step_is_provisioned_by_the_next_station_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, make_bundle: BundleFactory,
    images: Images, point: str,
) -> None:
    bundle = make_bundle("1.0", image=images.v2)
    ca_key, ca_cert = make_ca(tmp_path / "ca")
    log = tmp_path / "factory.jsonl"
    relay = Relay()
    dev = BlankDevice(tmp_path / "device", capsys, backend="uboot", keyring=signing_key.public, compatible=COMPATIBLE)
    add_console(dev.config, relay.device.path, idle_timeout=60.0)
    device = DeviceProcess(dev, relay)
    argv = ["--port", relay.host.path, "--device-id", "line2-001", "--bundle", str(bundle), "--ca", str(ca_key),
            "--ca-cert", str(ca_cert), "--log", str(log), "--timeout", "2", "--reconnect", "1"]
    try:
        device.start(point)
        first = station(*argv)
        assert device.stop() == -signal.SIGKILL
        key = dev.dir / "provision" / "key.pem"
        key_before = key.read_bytes() if key.exists() else None
        device.start()
        second = station(*argv)
    finally:
        device.stop()
        relay.close()
    records = log_lines(log)
    assert first == 1
    assert records[0]["result"] == "failed"
    assert second == 0, records
    assert records[-1]["result"] == "provisioned"
    assert records[-1]["public_key_sha256"] == dev.record["public_key_sha256"]
    assert dev.record["complete"] is True
    assert dev.record["device_id"] == "line2-001"
    if key_before is not None:
        assert key.read_bytes() == key_before
    for b in ("A", "B"):
        assert dev.slot_sha256(b, images.v2.size) == images.v2.sha256
