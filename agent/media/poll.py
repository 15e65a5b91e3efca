"""The polling fallback for systems where no udev rule starts
`ota-media@.service`: `ota-agent media-poll` (run every few seconds by
`ota-media-poll.timer`) lists the removable block devices in sysfs and names
the ones that appeared since the last poll, once per insertion.

A device is removable when its disk says so (`removable` is 1) or sits on USB
(its sysfs path runs through a USB device). A disk with partitions is
represented by its partitions. An insertion is told by the device's identity:
name, device number, size and, where the kernel has it, `diskseq` (a counter
that changes with every new medium). Identities are kept in
STATE_DIR/media-seen.json, replaced atomically; a device that is gone is
forgotten, so inserting the stick again installs again. Owns discovery only;
the caller runs `media` on each new device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ota_common.fsutil import atomic_write, read_regular

SEEN_FILE = "media-seen.json"
MAX_DEVICES = 256
MAX_SEEN_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class BlockDevice:
    name: str
    number: str  # MAJOR:MINOR
    size: int  # 512-byte sectors
    diskseq: str

    @property
    def identity(self) -> str:
        return f"{self.name} {self.number} {self.size} {self.diskseq}"


def _attr(path: Path) -> str:
    try:
        return read_regular(path, 256).decode("ascii", "replace").strip()
    except (OSError, ValueError):
        return ""


def removable_devices(sysfs: Path = Path("/sys")) -> list[BlockDevice]:
    base = sysfs / "class" / "block"
    try:
        names = sorted(os.listdir(base))[:MAX_DEVICES]
    except OSError:
        return []
    out = []
    for name in names:
        node = base / name
        real = Path(os.path.realpath(node))
        partition = (node / "partition").exists()
        disk = real.parent if partition else real
        if not (_attr(disk / "removable") == "1" or "/usb" in str(real)):
            continue
        if not partition and any((real / child / "partition").exists() for child in _children(real, name)):
            continue  # the partitions stand for it
        size = _attr(node / "size")
        if not size.isdigit() or int(size) == 0:
            continue  # an empty card reader slot
        out.append(BlockDevice(name, _attr(node / "dev"), int(size), _attr(disk / "diskseq")))
    return out


def _children(real: Path, name: str) -> list[str]:
    try:
        return [c for c in os.listdir(real) if c.startswith(name)]
    except OSError:
        return []


def _load(path: Path) -> set[str]:
    try:
        doc = json.loads(read_regular(path, MAX_SEEN_BYTES))
    except (OSError, ValueError):
        return set()
    return {s for s in doc if isinstance(s, str)} if isinstance(doc, list) else set()


def _save(path: Path, seen: set[str]) -> None:
    atomic_write(path, json.dumps(sorted(seen)).encode() + b"\n", mode=0o600)


def new_devices(state_dir: Path, sysfs: Path = Path("/sys")) -> list[BlockDevice]:
    """The removable devices not seen by the last poll, now marked seen (before
    they are handled: a stick that takes the agent down is not retried in a loop)."""
    path = state_dir / SEEN_FILE
    seen = _load(path)
    present = removable_devices(sysfs)
    now = {d.identity for d in present}
    fresh = [d for d in present if d.identity not in seen]
    if now != seen:
        _save(path, now)
    return fresh
