"""The polling fallback (`ota-agent media-poll`, run by ota-media-poll.timer
where no udev rule starts ota-media@.service): each poll runs `media` on the
removable block devices that appeared since the last one, once per insertion.
A real ext4 stick on a real loop device, described by a sysfs tree the test
writes (the loop device itself is not removable), so insertion, a second poll,
removal and re-insertion are the test's to make."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.e2e._sim import SimDevice
from tests.e2e._stick import assert_nothing_left_mounted, ext4_stick, loop_device, media_events, needs_loop
from tests.e2e.conftest import BundleFactory

pytestmark = needs_loop


def attach(sysfs: Path, dev: Path, *, removable: str = "1", diskseq: str = "7") -> None:
    node = sysfs / "class" / "block" / dev.name
    node.mkdir(parents=True)
    real = Path("/sys/class/block") / dev.name
    for attr in ("size", "dev"):
        (node / attr).write_text((real / attr).read_text())
    (node / "removable").write_text(f"{removable}\n")
    (node / "diskseq").write_text(f"{diskseq}\n")


def poll(device: SimDevice, sysfs: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "agent.cli", "-c", str(device.config), "media-poll", "--sysfs", str(sysfs)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def test_each_insertion_is_handled_once_and_again_after_reinsertion(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    tree = tmp_path / "stick" / "edge-ota"
    tree.mkdir(parents=True)
    shutil.copyfile(make_bundle("2.0"), tree / "v2.otab")
    image = ext4_stick(tmp_path / "stick.img", tmp_path / "stick")
    sysfs = tmp_path / "sys"
    (sysfs / "class" / "block").mkdir(parents=True)
    with loop_device(image) as dev:
        assert poll(device, sysfs).returncode == 0  # nothing inserted yet
        assert media_events(device) == []
        attach(sysfs, dev, removable="0")  # a fixed disk is never touched
        assert poll(device, sysfs).returncode == 0
        assert media_events(device) == []
        shutil.rmtree(sysfs / "class" / "block" / dev.name)

        attach(sysfs, dev)  # inserted
        first = poll(device, sysfs)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("installed version 2.0 into slot B")
        again = poll(device, sysfs)  # still in: not handled twice
        assert (again.returncode, again.stdout) == (0, "")

        shutil.rmtree(sysfs / "class" / "block" / dev.name)  # pulled
        assert poll(device, sysfs).returncode == 0
        attach(sysfs, dev, diskseq="8")  # inserted again
        third = poll(device, sysfs)
    assert third.returncode == 0, third.stderr
    assert third.stdout.startswith(f"nothing to install: no bundle on /dev/{dev.name} is newer than version "
                                   "factory or the pending 2.0 for this device")
    assert [e["result"] for e in media_events(device)] == ["installed", "nothing-to-install"]
    assert_nothing_left_mounted(device)
