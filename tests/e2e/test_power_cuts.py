"""Power cut at named points of an install and of the boot assessment: the
agent runs as a real process and SIGKILLs itself at the point
(EDGE_OTA_CRASHPOINT), then the device powers on. Whatever the point, the
device boots a good slot, the booted slot's file is untouched, the agent
reports a state consistent with the slots, and the next install works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.crashpoint import ENV
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, Images


def killed_at(point: str, device: SimDevice, *argv: str) -> None:
    env = {**os.environ, ENV: point}
    cmd = [sys.executable, "-m", "agent.cli", "-c", str(device.config), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr.decode())


@pytest.mark.parametrize("point", ["after-mark-bad", "mid-payload", "before-read-back"])
def test_power_cut_during_install_keeps_the_booted_slot_and_reports_the_interrupted_install(
    device: SimDevice, make_bundle: BundleFactory, point: str
) -> None:
    bundle = make_bundle("2.0", security_version=2)
    booted_before = device.snapshot().slot("A")
    killed_at(point, device, "install", str(bundle))

    device.boot()
    status = device.status()
    assert status["booted"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert status["slots"]["B"]["version"] is None
    assert status["trial"] is None
    last = status["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert "interrupted" in last["reason"]
    assert device.snapshot().slot("A") == booted_before

    device.install_ok(bundle)
    device.boot()
    assert device.status()["booted"] == "B"


def test_power_cut_after_the_slot_was_made_primary_still_tries_and_commits_it(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    killed_at("after-set-primary", device, "install", str(make_bundle("2.0", security_version=2)))
    run = device.boot()
    assert "trial boot" in run.out
    status = device.status()
    assert status["booted"] == "B"
    assert status["slots"]["B"]["boot_state"] == "good"
    assert status["slots"]["B"]["version"] == "2.0"
    assert status["slots"]["B"]["sha256"] == images.v2.sha256
    assert status["committed_security_version"] == 2


def test_power_cut_right_after_commit_in_the_bootloader_completes_the_commit_on_next_boot(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    device.power_on_without_boot_check()  # the firmware picks B for its trial
    killed_at("after-mark-good", device, "boot-check", "--no-reboot")
    assert device.status()["committed_security_version"] == 0  # the cut came before the state was saved

    run = device.boot()
    assert "committed slot" in run.out
    status = device.status()
    assert status["booted"] == "B"
    assert status["committed_security_version"] == 2
    assert status["trial"] is None
    assert status["last_result"]["event"] == "commit"


def test_power_cut_after_a_failed_health_check_still_falls_back(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    device.install_ok(make_bundle("2.0", security_version=2))
    device.power_on_without_boot_check()
    config = device.config.read_text().replace("commands = []", 'commands = [["false"]]').replace(
        "deadline = 30", "deadline = 1"
    )
    device.config.write_text(config)
    killed_at("after-mark-bad-trial", device, "boot-check", "--no-reboot")

    device.boot()
    status = device.status()
    assert status["booted"] == "A"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert status["last_result"]["event"] == "rollback"
    assert status["trial"] is None
