"""The update cycle on the virtual device through the other transports
(`make vm-test`, or VM_STEPS=usb,mqtt,serial), one fresh machine in order:

6. usb: a stick image with v2 plugged in through the QEMU monitor; the
   packaged udev rule starts ota-media@.service, which installs it; the
   receipt is on the stick (read on the host); reboot; B commits.
7. mqtt: `ota-fleet deploy --wait` from the host's mosquitto: the device
   installs into A, reboots itself, A commits, the job ends `succeeded`.
8. serial: `ota-console PTY put` over the guest's ttyS1 (`[console] ports`)
   (under TCG `--cmd 'install URL'`, VM_SERIAL_PUT=1 for `put`: about an
   hour for the 86 MB bundle at the emulated UART's ~23 KB/s); reboot; B
   commits.

Each step builds on the previous one's slots; the test prints a timeline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import scenario as sc
from tests.vm import transports as tr
from tests.vm.build import Image, ensure_image
from tests.vm.machine import Machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the VM image needs root (chroot)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 absent"),
    pytest.mark.skipif(shutil.which("grub-mkimage") is None, reason="grub-pc-bin absent"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap absent"),
    pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto absent"),
    pytest.mark.skipif(shutil.which("mcopy") is None, reason="mtools absent"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vm-transports")


@pytest.fixture(scope="module")
def broker(run_dir: Path) -> Iterator[int]:
    with tr.mosquitto(run_dir / "mosquitto", tr.broker_port()) as port:
        yield port


@pytest.fixture(scope="module")
def device(run_dir: Path, broker: int) -> Iterator[sc.Device]:
    image: Image = ensure_image()
    disk = run_dir / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image.disk), str(disk)], check=True)
    for v in (tr.USB_VARIANT, tr.mqtt_variant(broker), tr.SERIAL_VARIANT):
        sc.bundle(image, v)
    timeline = sc.Timeline()
    machine = Machine(disk, run_dir, second_serial=True)
    with sc.http_server(Path(image.directory) / "bundles") as port:
        d = sc.Device(machine, image, port, timeline, say=print)
        machine.start()
        try:
            d.boot("A", "committed", "boot v1 from A")
            d.wait_assessed()
            yield d
        finally:
            machine.kill()
            print(f"\nvirtual device timeline ({machine.accel}):\n{timeline.render()}\nconsole log: {machine.log_path}")


def test_6_a_usb_stick_plugged_in_is_installed_by_the_udev_rule_and_committed(
    device: sc.Device, run_dir: Path
) -> None:
    r = tr.usb_stick_installs(device, run_dir)
    assert r["unit_result"] == "success", r["journal"]
    (receipt,) = [f["receipt"] for f in r["receipts"] if f["receipt"] is not None]
    assert receipt["result"] == "installed", receipt
    assert receipt["new_version"] == "2.0.0"
    assert receipt["slot"] == "B"
    assert r["boot_check"] == "active"
    st = r["status"]
    assert st["booted"] == "B"
    assert st["slots"]["B"]["boot_state"] == "good"
    assert st["slots"]["B"]["version"] == "2.0.0"
    assert st["committed_security_version"] == 2


def test_7_ota_fleet_deploy_over_mqtt_follows_the_job_to_succeeded(device: sc.Device, broker: int) -> None:
    r = tr.mqtt_deploy(device, broker)
    assert r["exit"] == 0, r["stderr"]
    (result,) = r["results"]
    assert result["device"] == tr.DEVICE_ID
    assert result["status"] == "succeeded", result
    assert r["boot_check"] == "active"
    st, slot = r["status"], r["target"]
    assert st["booted"] == slot
    assert st["slots"][slot]["boot_state"] == "good"
    assert st["slots"][slot]["version"] == "3.1.0"
    assert st["committed_security_version"] == 3


def test_8_ota_console_put_over_the_serial_line_installs_and_commits(device: sc.Device) -> None:
    r = tr.serial_install(device)
    assert r["boot_check"] == "active"
    st, slot = r["status"], r["target"]
    assert st["booted"] == slot
    assert st["slots"][slot]["boot_state"] == "good"
    assert st["slots"][slot]["version"] == "4.1.0"
    assert st["committed_security_version"] == 4
