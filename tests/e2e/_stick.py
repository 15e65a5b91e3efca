"""USB sticks for the media tests: real filesystem images (ext4 via
`mkfs.ext4 -d`, FAT via `ota-bundle usb prepare --image`), attached as real
loop devices (`losetup -f --show`, detached in a `finally` whatever happens),
read back without mounting (debugfs, mtools), and `ota-agent media` run as its
own process: the same entry point the udev rule's unit calls.

Owns only images, loop devices and processes; the agent does all mounting.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._sim import SimDevice

HAVE_LOOP = os.geteuid() == 0 and shutil.which("losetup") is not None and Path("/dev/loop-control").exists()
needs_loop = pytest.mark.skipif(not HAVE_LOOP, reason="loop devices need root and losetup")
TIMEOUT = 120


@contextlib.contextmanager
def loop_device(image: Path, *, read_only: bool = False) -> Iterator[Path]:
    out = subprocess.run(["losetup", "-f", "--show", *(["-r"] if read_only else []), str(image)],
                         check=True, capture_output=True, text=True)
    dev = Path(out.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False, capture_output=True)


def ext4_stick(image: Path, tree: Path, size_mib: int = 48) -> Path:
    """An ext4 image holding `tree` (no journal: a stick's filesystem, and a
    truncated backing file then fails only where the data is)."""
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(tree), str(image), f"{size_mib}M"],
                   check=True, capture_output=True)
    return image


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], check=True, capture_output=True,
                          text=True).stdout


def ext4_receipts(image: Path) -> list[dict[str, Any]]:
    """The JSON receipts in edge-ota/reports of an ext4 image, read without mounting."""
    names = [line.split("/")[5] for line in debugfs(image, "ls -p /edge-ota/reports").splitlines()
             if line.count("/") >= 6]
    return [json.loads(debugfs(image, f"cat /edge-ota/reports/{n}")) for n in sorted(names) if n.endswith(".json")]


def media(device: SimDevice, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`ota-agent -c CONFIG media PATH` in its own process, as ota-media@.service runs it."""
    cmd = [sys.executable, "-m", "agent.cli", "-c", str(device.config), "media", str(path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False,
                          stdin=subprocess.DEVNULL)


def assert_nothing_left_mounted(device: SimDevice) -> None:
    mounts = Path("/proc/self/mounts").read_text()
    assert str(device.dir) not in mounts, mounts
    media_dir = device.dir / "state" / "media"
    assert not media_dir.exists() or list(media_dir.iterdir()) == []


def media_events(device: SimDevice) -> list[dict[str, Any]]:
    return [e for e in device.outbox() if e["event"] == "media"]


def unmount_all_under(directory: Path) -> None:
    """Test cleanup whatever the agent did: lazily unmount anything under `directory`."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1]
        if point.startswith(str(directory)):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
