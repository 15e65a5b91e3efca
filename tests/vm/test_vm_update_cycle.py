"""The whole update cycle on a real Linux system in QEMU (`make vm-test`): the
disk image of `make vm` (Debian bookworm, GRUB with the project's snippet,
the edge-ota .deb), driven over its serial console.

1. v1 boots from A; `ota-agent status` and `grub-editenv` agree.
2. v2 installed from HTTP on the host; reboot; GRUB tries B; the health check
   passes; boot-check commits B with security version 2.
3. v3's health check fails: boot-check marks A bad and reboots; B runs again;
   the report names the health check.
4. v4's boot hangs before its health check (vm-block.service, which
   boot-check waits for, never finishes): ota-trial-watchdog.service armed the
   i6300esb early and stops feeding it at v4's trial deadline, the watchdog
   resets the machine, GRUB tries A again until the tries are used up and falls
   back to B; the report names the watchdog.
5. Power cut (QEMU `quit`) at random moments of an install, VM_POWER_CUTS
   times (default 1, `make vm-test` 10): each time the device boots a good
   slot (the running one, or the new one's trial, committed, when the cut came
   after the install had finished), and an install after the last cut succeeds
   and commits.

One machine runs all steps in order (each builds on the previous state);
the test prints a timeline. VM_STEPS selects steps: all with KVM; under TCG
(this host's KVM cannot run guests, a boot takes a minute or more) only
step 1 unless `make vm-test` (VM_STEPS=all).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import scenario as sc
from tests.vm.build import Image, ensure_image
from tests.vm.machine import Machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the VM image needs root (chroot)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 absent"),
    pytest.mark.skipif(shutil.which("grub-mkimage") is None, reason="grub-pc-bin absent"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap absent"),
]

CUTS = int(os.environ.get("VM_POWER_CUTS", "1"))
SEED = int(os.environ.get("VM_SEED", "13"))


@pytest.fixture(scope="module")
def image() -> Image:
    return ensure_image()


@pytest.fixture(scope="module")
def device(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sc.Device]:
    run = tmp_path_factory.mktemp("vm")
    disk = run / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image.disk), str(disk)], check=True)
    variants = [sc.V2, sc.V3, sc.V4] + [sc.powercut_variant(n) for n in range(CUTS + 1)]
    for v in variants:
        sc.bundle(image, v)
    timeline = sc.Timeline()
    machine = Machine(disk, run)
    with sc.http_server(Path(image.directory) / "bundles") as port:
        d = sc.Device(machine, image, port, timeline, say=print)
        machine.start()
        try:
            yield d
        finally:
            machine.kill()
            print(f"\nvirtual device timeline ({machine.accel}):\n{timeline.render()}\nconsole log: {machine.log_path}")


def test_1_v1_boots_from_a_and_status_agrees_with_grubenv(device: sc.Device) -> None:
    r = sc.first_boot(device)
    st, env = r["status"], r["env"]
    assert st["booted"] == "A"
    assert st["bootloader"] == "grub"
    assert st["slots"]["A"]["boot_state"] == "good"
    assert st["slots"]["A"]["version"] == "1.0.0"
    assert st["problems"] == []
    assert env["ORDER"] == "A B"
    assert env["A_OK"] == "1"
    assert env["A_TRY"] == "0"
    assert "OTA_A_LEFT" not in env or env["OTA_A_LEFT"] == ""


def test_1_a_usb_stick_plugged_in_through_the_monitor_appears_in_the_guest(device: sc.Device, tmp_path: Path) -> None:
    # The hook the USB-stick transport will use: a FAT stick holding a bundle.
    stick = tmp_path / "stick.img"
    subprocess.run(["mkfs.vfat", "-C", "-n", "OTASTICK", str(stick), "8192"], check=True, capture_output=True)
    device.m.plug_stick(stick)
    _, out = device.m.sh("for i in $(seq 60); do blkid -L OTASTICK && break; sleep 1; done", timeout=120)
    assert "/dev/sd" in out
    device.m.unplug_stick()


def test_2_v2_from_http_is_tried_in_b_and_committed(device: sc.Device) -> None:
    r = sc.update_commits(device)
    st, env = r["status"], r["env"]
    assert r["boot_check"] == "active"
    assert st["booted"] == "B"
    assert st["slots"]["B"]["boot_state"] == "good"
    assert st["slots"]["B"]["version"] == "2.0.0"
    assert st["committed_security_version"] == 2
    assert st["trial"] is None
    assert env["ORDER"].split()[0] == "B"
    assert env.get("OTA_B_LEFT", "") == ""
    assert env["OTA_LAST_GOOD"] == "B"


def test_3_v3_failing_its_health_check_rolls_back_to_b(device: sc.Device) -> None:
    r = sc.failing_health_rolls_back(device)
    st = r["status"]
    assert st["booted"] == "B"
    assert st["slots"]["B"]["boot_state"] == "good"
    assert st["slots"]["A"]["boot_state"] == "bad"
    assert st["committed_security_version"] == 2
    last = st["last_result"]
    assert last["result"] == "rolled-back", last
    assert "health" in last["reason"], last
    assert "vm-health" in last["reason"], last


def test_4_v4_blocking_before_its_health_check_is_reset_by_the_watchdog_until_grub_falls_back(
    device: sc.Device,
) -> None:
    r = sc.hang_resets_and_falls_back(device, tries=3)
    st, before, tried = r["status"], r["booted_before"], r["tried"]
    assert st["booted"] == before
    assert st["slots"][before]["boot_state"] == "good"
    assert st["slots"][tried]["boot_state"] == "bad"
    last = st["last_result"]
    assert last["result"] == "rolled-back", last
    assert "watchdog" in last["reason"], last
    assert "hung and was reset by the watchdog" in last["reason"], last


def test_5_power_cuts_during_installs_always_boot_a_good_slot(device: sc.Device) -> None:
    rng = random.Random(SEED)
    seen = sc.power_cuts(device, CUTS, rng, device.status()["booted"])
    assert all(sc.good_slot_booted(s) for s in seen)
    assert all(s["trial"] is None for s in seen)
    # A cut after the install had finished boots the new slot's trial, which commits.
    before = seen[-1]["booted"]
    # The next install (a version no cut installed) succeeds and its slot commits.
    last = sc.powercut_variant(CUTS)
    device.install(last)
    other = "A" if before == "B" else "B"
    device.reboot()
    device.boot(other, "trial", f"reboot: GRUB tries {last.version} in {other}")
    assert device.wait_assessed() == "active"
    st = device.status()
    assert st["booted"] == other
    assert st["slots"][other]["boot_state"] == "good"
    assert st["slots"][other]["version"] == last.version
    assert st["committed_security_version"] == 5
