"""A device that still boots RAUC's stock U-Boot script (which counts the first
slot down on every boot, committed or not) keeps its committed slot: boot-check
restores the counter on every boot, the way rauc-mark-good.service does."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.e2e.conftest import DeviceFactory

pytestmark = pytest.mark.skipif(shutil.which("fw_setenv") is None, reason="libubootenv-tool not installed")


def test_boot_check_restores_the_committed_slots_counter_that_rauc_stock_script_decremented(
    make_device: DeviceFactory,
) -> None:
    device = make_device(bootloader="uboot")
    config = str(device.dir / "fw_env.config")

    def left() -> str:
        cmd = ["fw_printenv", "-c", config, "-n", "BOOT_A_LEFT"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    for _ in range(5):
        # What RAUC's script does at power-on: BOOT_A_LEFT -= 1, boot A.
        subprocess.run(["fw_setenv", "-c", config, "BOOT_A_LEFT", str(int(left(), 16) - 1)], check=True)
        run = device.agent("boot-check")
        assert run.rc == 0, run.err
        assert "boot counters restored" in run.out
        assert left() == "3"
    run = device.agent("boot-check")
    assert "nothing to do" in run.out  # an untouched environment is not rewritten
