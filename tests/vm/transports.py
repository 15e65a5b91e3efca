"""The update cycle on the virtual device through each transport that is not
the HTTP of `ota-agent install` (tests/vm/test_vm_transports.py):

- USB: a FAT stick image made by `ota-bundle usb prepare --image`, plugged in
  through the QEMU monitor (`drive_add` + `device_add usb-storage`); the
  guest's packaged udev rule starts `ota-media@DEV.service`, which hands
  `ota-agent media /dev/DEV` to the daemon; the receipt is read back from the
  image on the host with `ota-bundle usb report --image`.
- MQTT: a mosquitto on the host's loopback (10.0.2.2 in the guest: QEMU's user
  networking forwards it there), the guest's agent.toml given an `[mqtt]`
  table; `ota-fleet deploy --wait` follows the job through the reboot and
  the commit to `succeeded`.
- Serial: the guest's ttyS1 on a host pty (`Machine(second_serial=True)`),
  `[console] ports = ["/dev/ttyS1"]`; the host runs `ota-console PTY put`
  (or, under TCG, `ota-console PTY --cmd 'install URL'`: `serial_put_selected`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.fixtures.procs import spawn, stop_process, wait_for_ports
from tests.vm.machine import GuestError, kvm_usable
from tests.vm.paths import TOP
from tests.vm.scenario import BOOT_TIMEOUT, V2, Device, Variant, bundle

DEVICE_ID = "edge-ota-vm"
PREFERRED_BROKER_PORT = 18883  # fixed when free, so the MQTT variant's bundle stays cached


def mqtt_table(port: int) -> str:
    return f'[mqtt]\nbroker = "mqtt://10.0.2.2:{port}"\ndevice_id = "{DEVICE_ID}"\n'


USB_VARIANT = V2


def mqtt_variant(port: int) -> Variant:
    """Its image keeps the [mqtt] table, so the agent that boots it reports the commit."""
    return Variant("3.1.0", 3, "ok", config=mqtt_table(port))


SERIAL_VARIANT = Variant("4.1.0", 4, "ok")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def broker_port() -> int:
    if _free(PREFERRED_BROKER_PORT):
        return PREFERRED_BROKER_PORT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextmanager
def mosquitto(directory: Path, port: int) -> Iterator[int]:
    """A mosquitto on 127.0.0.1:`port` (anonymous, no persistence); yields the port."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    log = directory / "mosquitto.log"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
        f"log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\n"
    )
    proc = spawn(["/usr/sbin/mosquitto", "-c", str(conf)], directory / "stdout.log")
    try:
        wait_for_ports(proc, [port], 10.0, "mosquitto", log)
        yield port
    finally:
        stop_process(proc)


def other_slot(d: Device) -> str:
    return "A" if d.status()["booted"] == "B" else "B"


def _tool(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=TOP, capture_output=True, text=True, timeout=timeout, check=False
    )


def _install_media_dropin(d: Device) -> None:
    """The daemon mounts sticks only with the drop-in docs/media.md says to install."""
    text = (TOP / "systemd/ota-agent.service.d/media.conf").read_text()
    d.write_file("/etc/systemd/system/ota-agent.service.d/media.conf", text)
    d.m.sh("systemctl daemon-reload && systemctl restart ota-agent.service", timeout=300)


def usb_stick_installs(d: Device, work: Path) -> dict[str, Any]:
    """Plugs a stick holding the v2 bundle; the guest's udev rule and
    ota-media@.service install it; reboot into the trial; commit."""
    v = USB_VARIANT
    stick = work / "stick.img"
    done = _tool(
        "bundler.cli", "usb", "prepare", "--image", str(stick), "--size", "160M", str(bundle(d.image, v)), timeout=300
    )
    if done.returncode:
        raise GuestError(f"ota-bundle usb prepare: {done.stderr.strip()}")
    _install_media_dropin(d)
    with d.timeline.step(f"USB stick with {v.version} plugged in: udev, ota-media@, install"):
        d.m.plug_stick(stick)
        _, dev = d.m.sh("for i in $(seq 120); do blkid -L OTASTICK && break; sleep 1; done", timeout=300)
        name = dev.strip().splitlines()[-1].removeprefix("/dev/") if "/dev/" in dev else ""
        if not name:
            raise GuestError(f"the stick did not appear in the guest: {dev!r}")
        unit = f"ota-media@{name}.service"
        # Started by udev (nothing here starts it). Read from the journal: a finished
        # instance of a static template is unloaded at once (systemctl show then
        # answers defaults), systemd's own "Finished"/"Failed" lines stay.
        journal = f"journalctl -q -o cat --no-pager -u {unit}"
        seen = f"{journal} | grep -q ."
        status, _ = d.m.sh(f"for i in $(seq 60); do {seen} && break; sleep 2; done; {seen}", 300, False)
        if status:
            _, why = d.m.sh(f"udevadm info --query=property /dev/{name}; systemctl status {unit}", check=False)
            raise GuestError(f"udev did not start {unit}:\n{why}")
        ended = "Finished ota-media@\\|Failed to start ota-media@"
        d.m.sh(f"for i in $(seq 450); do {journal} | grep -q '{ended}' && break; sleep 2; done", 1000)
        _, journal = d.m.sh(f"{journal} | tail -n 20", check=False)
        result = "success" if f"Finished {unit}" in journal else "failed"
        d.m.sh("sync")
    d.say(f"{unit}: {result}\n{journal.strip()}")
    d.m.unplug_stick()
    d.m.sh("sleep 2")
    report = _tool("bundler.cli", "usb", "report", "--image", str(stick), "--json", timeout=120)
    if report.returncode:
        raise GuestError(f"ota-bundle usb report: {report.stderr.strip()}")
    receipts = json.loads(report.stdout)["receipts"]
    d.reboot()
    d.boot("B", "trial", f"reboot: GRUB tries {v.version} (from the stick) in B")
    state = d.wait_assessed()
    return {
        "unit": unit,
        "unit_result": result,
        "journal": journal,
        "receipts": receipts,
        "boot_check": state,
        "status": d.status(),
    }


def mqtt_deploy(d: Device, port: int) -> dict[str, Any]:
    """`ota-fleet deploy --wait` of a bundle URL to the device over the host's
    mosquitto: install, the agent's own reboot, the trial and the commit."""
    v = mqtt_variant(port)
    bundle(d.image, v)
    target = other_slot(d)
    d.add_config(mqtt_table(port))
    url = f"http://10.0.2.2:{d.port}/{v.filename}"
    with d.timeline.step(f"ota-fleet deploy {v.version} over MQTT (install, reboot, trial, commit)"):
        done = _tool(
            "bundler.fleet.cli",
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "deploy",
            "--device",
            DEVICE_ID,
            "--url",
            url,
            "--wait",
            "--timeout",
            str(int(BOOT_TIMEOUT * 3)),
            "--json",
            timeout=BOOT_TIMEOUT * 3 + 60,
        )
    d.say(f"ota-fleet deploy: exit {done.returncode}\n{done.stdout.strip()}\n{done.stderr.strip()[-2000:]}")
    d.boot(target, "trial", f"the agent rebooted: GRUB tries {v.version} in {target}")
    state = d.wait_assessed()
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {
        "target": target,
        "exit": done.returncode,
        "results": results,
        "stderr": done.stderr,
        "boot_check": state,
        "status": d.status(),
    }


def serial_put_selected() -> bool:
    """VM_SERIAL_PUT: upload the bundle itself over the line (`ota-console put`).
    Default: with KVM only. Under TCG QEMU's emulated 16550 moved ~23 KB/s
    (a few bytes per interrupt), so the 86 MB bundle would take about an hour;
    the console then starts the install from the URL instead (`install URL`,
    confirmed by ota-console like `put`)."""
    return os.environ.get("VM_SERIAL_PUT", "1" if kvm_usable() else "0") == "1"


def serial_install(d: Device) -> dict[str, Any]:
    """An install through the guest's ttyS1 (`[console] ports`) from the host's
    `ota-console`: `put BUNDLE` or `--cmd 'install URL'`; reboot; commit."""
    v = SERIAL_VARIANT
    path = bundle(d.image, v)
    target = other_slot(d)
    d.add_config('[console]\nports = ["/dev/ttyS1"]\n')
    pty = d.m.serial_pty()
    if serial_put_selected():
        what = f"ota-console put {v.version} ({path.stat().st_size / 1e6:.0f} MB) over ttyS1"
        argv = ["--timeout", "60", pty, "put", str(path)]
    else:
        what = f"ota-console over ttyS1: install {v.version} from its URL"
        argv = ["--timeout", "60", pty, "--cmd", f"install http://10.0.2.2:{d.port}/{v.filename}"]
    with d.timeline.step(what):
        done = _tool("bundler.console.cli", *argv, timeout=BOOT_TIMEOUT * 4)
    d.say(f"{what}: exit {done.returncode}\n{done.stdout.strip()[-1500:]}\n{done.stderr.strip()[-1500:]}")
    if done.returncode:
        raise GuestError(f"ota-console failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-2000:]}")
    d.reboot()
    d.boot(target, "trial", f"reboot: GRUB tries {v.version} (from the console) in {target}")
    state = d.wait_assessed()
    return {"target": target, "output": done.stdout + done.stderr, "boot_check": state, "status": d.status()}
