"""Provisioning killed (SIGKILL) at every named step, then run again: the re-run
continues where the record says, never makes a second key, and ends exactly like
an uninterrupted run (the image in both slots, every slot good with A primary,
the record complete, the device config loading)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from agent import config as config_mod
from hw.bootloader import model
from tests.e2e._factory import BlankDevice
from tests.e2e._sim import COMPATIBLE
from tests.e2e.conftest import BundleFactory, Images, KeyPair

POINTS = [
    "provision-after-key", "provision-after-identity", "provision-after-config", "after-mark-bad",
    "after-trial-saved", "mid-payload", "before-read-back", "provision-after-image", "provision-after-bootloader",
    "provision-after-record",
]


CASES = [(p, "sim") for p in POINTS] + [(p, "grub") for p in ("after-mark-bad", "mid-payload",
                                                                "provision-after-bootloader")]


@pytest.mark.parametrize(("point", "backend"), CASES)
def test_provisioning_killed_at_each_step_resumes_and_keeps_the_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, make_bundle: BundleFactory,
    images: Images, point: str, backend: str,
) -> None:
    device = BlankDevice(tmp_path / "device", capsys, backend=backend, keyring=signing_key.public,
                         compatible=COMPATIBLE, broker="mqtt://127.0.0.1:1883")
    bundle = make_bundle("1.0", security_version=2, image=images.v2)
    killed = device.provision_killed_at(point, bundle, "--device-id", "gw-0100")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    key = device.dir / "provision" / "key.pem"
    key_before = key.read_bytes() if key.exists() else None
    recorded = set(device.record["steps"]) if (device.dir / "provision" / "record.json").exists() else set()
    if point == "provision-after-record":
        assert device.record["complete"] is True
        assert "already provisioned" in device.provision(bundle).one_error_line()
    else:
        doc = device.provision_ok(bundle)
        assert set(doc["steps_skipped"]) == recorded
        assert doc["device_id"] == "gw-0100"
    if key_before is not None:
        assert key.read_bytes() == key_before, "the identity was made again"
    assert device.record["complete"] is True
    assert device.record["device_id"] == "gw-0100"
    for b in ("A", "B"):
        assert device.slot_sha256(b, images.v2.size) == images.v2.sha256
    assert device.boot_state() == model.BootState.initial(("A", "B"))
    cfg = config_mod.load(device.device_config)
    assert cfg.mqtt is not None
    assert cfg.mqtt.device_id == "gw-0100"
    assert device.run("sim", "boot", str(device.dir)).rc == 0
