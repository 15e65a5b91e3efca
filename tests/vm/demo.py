"""`make vm-demo`: boots the virtual device with its serial console on this
terminal and runs the update cycle: v1 from A, v2 installed over HTTP and
committed in B, v3 failing its health check and rolled back, v4 locking up
and reset by the watchdog until GRUB falls back (VM_DEMO_STEPS=1,2,3 to stop
earlier). The machine is stopped at the end (or on Ctrl-C)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.vm import scenario as sc
from tests.vm.build import ensure_image
from tests.vm.machine import Machine


def _banner(text: str) -> None:
    sys.stdout.write(f"\n\033[1;36m>>> {text}\033[0m\n")
    sys.stdout.flush()


def main() -> int:
    steps = os.environ.get("VM_DEMO_STEPS", "1,2,3,4").split(",")
    _banner("building (or reusing) the virtual device image")
    image = ensure_image()
    for v in (sc.V2, sc.V3, sc.V4):
        sc.bundle(image, v)
    with tempfile.TemporaryDirectory(prefix="edge-ota-vm-demo.") as tmp:
        disk = Path(tmp) / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(image.disk), str(disk)], check=True)
        timeline = sc.Timeline()
        machine = Machine(disk, Path(tmp), echo=True)
        with sc.http_server(Path(image.directory) / "bundles") as port:
            d = sc.Device(machine, image, port, timeline, say=_banner)
            machine.start()
            try:
                _banner("power on: GRUB chooses a slot, Linux boots, ota-boot-check runs")
                sc.first_boot(d)
                if "2" in steps:
                    _banner("installing v2 from http://10.0.2.2 (the host), then rebooting into B")
                    sc.update_commits(d)
                if "3" in steps:
                    _banner("installing v3, whose health check fails: watch it roll back to B")
                    sc.failing_health_rolls_back(d)
                if "4" in steps:
                    _banner("installing v4, whose boot blocks before its health check: the watchdog resets it")
                    sc.hang_resets_and_falls_back(d)
                _, out = machine.sh("ota-agent status", timeout=120)
            finally:
                machine.kill()
    _banner("final status")
    print(out)
    _banner(f"timeline ({machine.accel})")
    print(timeline.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
