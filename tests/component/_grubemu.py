"""Test helpers for the GRUB backend: skip markers for the real tools, a
``grub-editenv`` wrapper, and `GrubEmuMachine`, which runs the shipped
``hw/scripts/grub.cfg`` in the real GRUB script interpreter (``grub-emu``).

The machine follows research/bootloader-in-the-loop.md (B.1): the grubenv lives
in a FAT partition of a disk image that a device.map exposes as ``(hd0)`` (GRUB's
``save_env`` needs a real disk, it refuses ``(host)`` files), the config sources
our snippet and then offers one menuentry per slot (``--id ota-<x>``) that
prints what it would boot and ends with ``halt``, so grub-emu exits by itself.
One boot takes about 0.05 s.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "hw" / "scripts" / "grub.cfg"

EMU_TOOLS = ("grub-emu", "grub-editenv", "mcopy", "mkfs.vfat", "sfdisk")
_missing_emu = [t for t in EMU_TOOLS if shutil.which(t) is None]

needs_grub_editenv = pytest.mark.skipif(
    shutil.which("grub-editenv") is None, reason="grub-editenv not installed (Debian package grub-common)"
)
needs_grub_emu = pytest.mark.skipif(
    bool(_missing_emu),
    reason=f"missing {', '.join(_missing_emu)} (Debian packages grub-emu grub-common mtools dosfstools fdisk)",
)

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[a-zA-Z]")
_CHOSEN = re.compile(r"ota: booting slot (\S*) \((.*?)\)")
_BOOTED = re.compile(r"OTA-BOOTED slot=(\S+) trial=(\d) cmdline=\[(.*?)\]")
PART_OFFSET = 1024 * 1024
_golden_disk: dict[str, bytes] = {}  # the blank disk image, built once per test session


def editenv(path: Path, *args: str) -> str:
    """Run the real ``grub-editenv PATH args...``; return stdout, fail the test on error."""
    proc = subprocess.run(["grub-editenv", str(path), *args], check=False, capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise AssertionError(f"grub-editenv {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def editenv_list(path: Path) -> dict[str, str]:
    """``grub-editenv list`` as a dict (values without newlines only)."""
    out = {}
    for line in editenv(path, "list").splitlines():
        name, _, value = line.partition("=")
        out[name] = value
    return out


@dataclass(frozen=True, slots=True)
class BootResult:
    slot: str
    reason: str
    trial: bool
    cmdline: str
    env: bytes
    log: str
    seconds: float


class GrubEmuMachine:
    """A disk image with a grubenv in FAT partition 1, and a GRUB config that
    sources the shipped snippet. `boot()` is one power-on."""

    def __init__(self, workdir: Path, bootnames: Sequence[str], snippet: Path = SNIPPET) -> None:
        self.dir = workdir
        self.bootnames = tuple(bootnames)
        workdir.mkdir(parents=True, exist_ok=True)
        self.disk = workdir / "disk.img"
        self.grubdir = workdir / "grub"
        self.grubdir.mkdir(exist_ok=True)
        self.device_map = workdir / "device.map"
        self._build_disk()
        self.device_map.write_text(f"(hd0) {self.disk}\n")
        shutil.copyfile(snippet, self.grubdir / "ota.cfg")
        self.write_config("set ota_env=(hd0,msdos1)/grubenv")

    def write_config(self, env_line: str) -> None:
        """The board's grub.cfg: where the env is, our snippet, one menuentry per slot."""
        entries = "".join(
            f'menuentry "slot {b}" --id ota-{b} {{\n'
            f'  echo "OTA-BOOTED slot={b} trial=$ota_trial cmdline=[$ota_cmdline]"\n'
            "  halt\n}\n"
            for b in self.bootnames
        )
        (self.grubdir / "grub.cfg").write_text(
            f'{env_line}\nset ota_slots="{" ".join(self.bootnames)}"\nsource $prefix/ota.cfg\nset timeout=0\n' + entries
        )

    def _build_disk(self) -> None:
        if "disk" not in _golden_disk:
            self._build_golden_disk()
            _golden_disk["disk"] = self.disk.read_bytes()
        else:
            self.disk.write_bytes(_golden_disk["disk"])

    def _build_golden_disk(self) -> None:
        part = self.dir / "part.img"
        part.unlink(missing_ok=True)
        _run(["mkfs.vfat", "-C", str(part), "3072"])
        editenv(self.dir / "grubenv", "create")
        _run(["mcopy", "-i", str(part), str(self.dir / "grubenv"), "::grubenv"])
        with self.disk.open("wb") as f:
            f.truncate(4 * 1024 * 1024)
        _run(["sfdisk", "-q", str(self.disk)], stdin="label: dos\nstart=2048, type=c\n")
        with self.disk.open("r+b") as f:
            f.seek(PART_OFFSET)
            f.write(part.read_bytes())
        part.unlink()

    def write_env(self, data: bytes) -> None:
        """Put raw grubenv bytes into the FAT partition (as the agent's write would land on the ESP)."""
        staged = self.dir / "grubenv"
        staged.write_bytes(data)
        _run(["mcopy", "-o", "-i", f"{self.disk}@@{PART_OFFSET}", str(staged), "::grubenv"])

    def read_env(self) -> bytes:
        proc = subprocess.run(
            ["mcopy", "-n", "-i", f"{self.disk}@@{PART_OFFSET}", "::grubenv", "-"],
            check=False,
            capture_output=True,
            timeout=10,
        )
        if proc.returncode != 0:
            raise AssertionError(f"mcopy read failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def boot(self, timeout: float = 20) -> BootResult:
        start = time.monotonic()
        proc = subprocess.run(
            ["grub-emu", "-m", str(self.device_map), "-d", str(self.grubdir)],
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            timeout=timeout,
        )
        seconds = time.monotonic() - start
        log = _ANSI.sub(b"", proc.stdout).replace(b"\r", b"").decode(errors="replace")
        chosen = _CHOSEN.search(log)
        booted = _BOOTED.search(log)
        if proc.returncode != 0 or chosen is None or booted is None:
            raise AssertionError(f"grub-emu did not boot a slot (rc={proc.returncode}):\n{log}")
        if booted.group(1) != chosen.group(1):
            raise AssertionError(f"snippet chose {chosen.group(1)} but menuentry {booted.group(1)} ran:\n{log}")
        return BootResult(
            slot=booted.group(1),
            reason=chosen.group(2),
            trial=booted.group(2) == "1",
            cmdline=booted.group(3),
            env=self.read_env(),
            log=log,
            seconds=seconds,
        )


def _run(cmd: list[str], stdin: str | None = None) -> None:
    proc = subprocess.run(cmd, check=False, input=stdin, capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
