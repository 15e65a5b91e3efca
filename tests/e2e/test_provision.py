"""`ota-agent provision` on blank simulated devices, through the real CLI: every
bootloader backend ends with the image in both slots and every slot good with A
primary; the key is made on the device (0600) and never shown; the device config
loads and names the device; the device then boots and reports. A second run is
refused (nothing changes) unless --force, which keeps the identity; a bundle for
another board, a delta, an untrusted signature or a booted slot are refused
before anything is written; a CA-issued certificate is checked and installed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import config as config_mod
from bundler.fleet.provision_ca import load_ca, make_ca, sign_csr
from bundler.format.manifest import ImageEntry, Manifest
from bundler.format.ops import Op, OpType
from bundler.format.signing import load_private_key
from bundler.format.writer import op_table_digest, write_bundle_file
from hw.bootloader import model
from tests.e2e._factory import REPO, BlankDevice
from tests.e2e._sim import COMPATIBLE
from tests.e2e.conftest import BundleFactory, Images, KeyPair

INITIAL = model.BootState.initial(("A", "B"))


@pytest.fixture
def blank(tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair) -> BlankDevice:
    return BlankDevice(tmp_path / "device", capsys, backend="sim", keyring=signing_key.public,
                       compatible=COMPATIBLE, broker="mqtts://broker.example:8883")


def key_body(device: BlankDevice) -> str:
    lines = (device.dir / "provision" / "key.pem").read_text().splitlines()
    return "".join(line for line in lines if not line.startswith("-----"))


@pytest.mark.parametrize("backend", ["sim", "uboot", "grub", "bls"])
def test_a_blank_device_is_provisioned_on_every_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, make_bundle: BundleFactory,
    images: Images, backend: str,
) -> None:
    device = BlankDevice(tmp_path / "device", capsys, backend=backend, keyring=signing_key.public,
                         compatible=COMPATIBLE, broker="mqtt://127.0.0.1:1883")
    bundle = make_bundle("1.0", security_version=3, image=images.v2)
    r = device.provision(bundle, "--device-id", "gw-0001", "--json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["device_id"] == "gw-0001"
    assert doc["steps_run"] == ["identity", "config", "image", "bootloader", "record"]
    assert doc["image_sha256"] == images.v2.sha256
    for b in ("A", "B"):
        assert device.slot_sha256(b, images.v2.size) == images.v2.sha256
    assert device.boot_state() == INITIAL
    key = device.dir / "provision" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = key_body(device)
    outbox = (device.dir / "state" / "outbox.log").read_text()
    for text in (r.out, r.err, outbox, json.dumps(device.record)):
        assert secret not in text
    assert "BEGIN CERTIFICATE REQUEST" in doc["csr"]
    cfg = config_mod.load(device.device_config)
    assert cfg.mqtt is not None
    assert cfg.mqtt.device_id == "gw-0001"
    assert cfg.compatible == COMPATIBLE
    assert device.record["complete"] is True
    assert device.record["public_key_sha256"] == doc["public_key_sha256"]
    # The provisioned device boots slot A and reports what both slots hold.
    assert device.run("sim", "boot", str(device.dir)).rc == 0
    status = json.loads(device.run("-c", str(device.device_config), "status", "--json").out)
    assert status["booted"] == "A"
    assert status["committed_security_version"] == 3
    assert {s["version"] for s in status["slots"].values()} == {"1.0"}


def test_a_second_provision_is_refused_and_force_keeps_the_identity(
    blank: BlankDevice, make_bundle: BundleFactory, images: Images
) -> None:
    first = blank.provision_ok(make_bundle("1.0", image=images.v2), "--device-id", "gw-0002")
    before = blank.tree()
    r = blank.provision(make_bundle("1.1", image=images.v3))
    error = r.one_error_line()
    assert "already provisioned as device gw-0002" in error
    assert "--force" in error
    after = blank.tree()
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {"state/outbox.log", "state/events.log"}, changed  # only the refusal's report
    again = blank.provision_ok(make_bundle("1.1", image=images.v3), "--force")
    assert again["public_key_sha256"] == first["public_key_sha256"]
    assert again["key_created"] is False
    assert again["device_id"] == "gw-0002"
    assert blank.slot_sha256("B", images.v3.size) == images.v3.sha256
    assert blank.record["forced"] == 1
    assert blank.provision(make_bundle("1.1", image=images.v3), "--force", "--device-id", "other").rc == 1


def _refused_before_anything_is_written(blank: BlankDevice, bundle: Path, expect: str) -> None:
    before = blank.tree()
    error = blank.provision(bundle).one_error_line()
    assert expect in error
    after = blank.tree()
    written = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert all(k.startswith("state/") for k in written), written  # at most the refusal's report
    assert not (blank.dir / "provision").exists()
    assert not (blank.dir / "bootloader.json").exists()
    assert not blank.device_config.exists()


def test_a_bundle_for_another_board_is_refused_before_anything_is_written(
    blank: BlankDevice, make_bundle: BundleFactory
) -> None:
    other = make_bundle("1.0", compatible="someone-elses-board")
    _refused_before_anything_is_written(blank, other, "bundle is for compatible 'someone-elses-board'")


def test_an_untrusted_signature_is_refused_before_anything_is_written(
    blank: BlankDevice, make_bundle: BundleFactory, other_key: KeyPair
) -> None:
    _refused_before_anything_is_written(blank, make_bundle("1.0", key=other_key), "none of which is in the keyring")


def test_a_delta_bundle_is_refused_before_anything_is_written(
    blank: BlankDevice, images: Images, signing_key: KeyPair, tmp_path: Path
) -> None:
    size = 1 << 20
    ops = [Op(OpType.ZERO, 0, size)]
    image = ImageEntry("rootfs", size, hashlib.sha256(bytes(size)).hexdigest(), 0, 1,
                       base_sha256=images.factory.sha256, base_size=images.factory.size)
    manifest = Manifest(bundle_version="2.0", security_version=1, compatible=COMPATIBLE,
                        created=datetime.now(UTC).replace(microsecond=0), expires=None, images=(image,),
                        op_count=1, op_table_sha256=op_table_digest(ops), payload_length=0)
    out = tmp_path / "delta.otab"
    write_bundle_file(out, manifest, ops, io.BytesIO(), [load_private_key(signing_key.private)])
    _refused_before_anything_is_written(blank, out, "provisioning needs a full bundle")


def test_a_device_running_from_a_slot_is_refused(blank: BlankDevice, make_bundle: BundleFactory) -> None:
    (blank.dir / "cmdline").write_text("root=/dev/mmcblk0p2 ota.slot=A\n")
    _refused_before_anything_is_written(blank, make_bundle("1.0"), "slot A is booted")


def test_slots_too_small_for_the_image_are_refused(blank: BlankDevice, make_bundle: BundleFactory,
                                                    images: Images) -> None:
    with (blank.dir / "slot-B.img").open("r+b") as f:
        f.truncate(1 << 20)
    _refused_before_anything_is_written(blank, make_bundle("1.0", image=images.v2), "the image needs")


def test_p256_identity_and_a_certificate_from_the_factory_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, make_bundle: BundleFactory
) -> None:
    device = BlankDevice(tmp_path / "device", capsys, backend="sim", keyring=signing_key.public,
                         compatible=COMPATIBLE, broker="mqtts://broker.example:8883", key_type="p256")
    r = device.agent("identity", "--device-id", "gw-0003", "--json")
    assert r.rc == 0, r.err
    ident = json.loads(r.out)
    assert ident["key_type"] == "p256"
    ca = load_ca(*make_ca(tmp_path / "ca"))
    issued = sign_csr(ca, ident["csr"])
    assert issued.fingerprint == ident["public_key_sha256"]
    (tmp_path / "device.crt").write_text(issued.cert_pem)
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    # A certificate from another CA is refused, and so is one for another key.
    rogue = load_ca(*make_ca(tmp_path / "rogue"))
    (tmp_path / "rogue.crt").write_text(sign_csr(rogue, ident["csr"]).cert_pem)
    r = device.provision(make_bundle("1.0"), "--cert", str(tmp_path / "rogue.crt"), "--ca-cert",
                         str(tmp_path / "ca.crt"))
    assert "not issued by the factory CA" in r.one_error_line()
    doc = device.provision_ok(make_bundle("1.0"), "--cert", str(tmp_path / "device.crt"), "--ca-cert",
                              str(tmp_path / "ca.crt"))
    assert doc["certificate"] is True
    assert doc["public_key_sha256"] == ident["public_key_sha256"]
    cfg = config_mod.load(device.device_config)
    assert cfg.mqtt is not None
    assert cfg.mqtt.cert == (device.dir / "provision" / "cert.pem").resolve()
    assert cfg.mqtt.key == (device.dir / "provision" / "key.pem").resolve()
    assert os.stat(device.dir / "provision" / "key.pem").st_mode & 0o077 == 0


def test_the_bundle_is_read_once_front_to_back_so_it_may_come_on_stdin(
    blank: BlankDevice, make_bundle: BundleFactory, images: Images
) -> None:
    bundle = make_bundle("1.0", image=images.v2)
    cmd = [sys.executable, "-m", "agent.cli", "-c", str(blank.config), "provision", "--bundle", "-", "--json"]
    with bundle.open("rb") as f:
        proc = subprocess.run(cmd, stdin=f, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image_sha256"] == images.v2.sha256
    for b in ("A", "B"):
        assert blank.slot_sha256(b, images.v2.size) == images.v2.sha256


def test_a_rerun_after_the_image_step_needs_no_bundle(
    blank: BlankDevice, make_bundle: BundleFactory, images: Images
) -> None:
    killed = blank.provision_killed_at("provision-after-image", make_bundle("1.0", image=images.v2))
    assert killed.returncode == -9
    r = blank.agent("provision", "--json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["steps_run"] == ["bootloader", "record"]
    assert doc["image_sha256"] == images.v2.sha256


def test_without_a_bundle_provisioning_waits_and_the_next_install_is_its_image(
    blank: BlankDevice, make_bundle: BundleFactory, images: Images
) -> None:
    r = blank.agent("provision", "--device-id", "gw-0004", "--json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["result"] == "waiting-for-image"
    assert doc["steps_run"] == ["identity", "config"]
    before = blank.tree()
    wrong = blank.agent("install", str(make_bundle("1.0", compatible="someone-elses-board")))
    assert "bundle is for compatible 'someone-elses-board'" in wrong.one_error_line()
    assert {k: v for k, v in blank.tree().items() if k.startswith("slot-")} == {
        k: v for k, v in before.items() if k.startswith("slot-")}
    r = blank.agent("install", str(make_bundle("1.0", image=images.v2)), "--json")
    assert r.rc == 0, r.err
    assert json.loads(r.out)["slot"] == "A B"
    assert blank.record["complete"] is True
    assert blank.record["device_id"] == "gw-0004"
    for b in ("A", "B"):
        assert blank.slot_sha256(b, images.v2.size) == images.v2.sha256
    assert blank.boot_state() == INITIAL
    # Provisioned now: an install is an update again, and needs a booted slot.
    assert "no ota.slot=" in blank.agent("install", str(make_bundle("1.0", image=images.v2))).one_error_line()


def test_provision_status_tells_a_station_the_board_and_how_far_it_got(
    blank: BlankDevice, make_bundle: BundleFactory, images: Images
) -> None:
    doc = json.loads(blank.agent("provision-status", "--json").out)
    assert doc["compatible"] == COMPATIBLE
    assert doc["complete"] is False
    assert doc["steps"] == []
    assert not (blank.dir / "provision").exists()  # asking writes nothing
    blank.agent("provision", "--device-id", "gw-0005")
    doc = json.loads(blank.agent("provision-status", "--json").out)
    assert doc["waiting_for_image"] is True
    assert doc["device_id"] == "gw-0005"
    blank.agent("install", str(make_bundle("1.0", image=images.v2)))
    doc = json.loads(blank.agent("provision-status", "--json").out)
    assert doc["complete"] is True
    assert doc["image_sha256"] == images.v2.sha256
    assert "provisioned as device gw-0005" in blank.agent("provision-status").out
