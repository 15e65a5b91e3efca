"""Test helpers for the U-Boot backend: skip markers for the real tools, wrappers
around libubootenv's ``fw_printenv``/``fw_setenv`` and u-boot-tools'
``mkenvimage``, and `UBootMachine`, the real U-Boot running the shipped
``hw/scripts/boot.scr`` under QEMU.

The machine follows research/bootloader-in-the-loop.md (A.4): Debian's
u-boot-sunxi ``orangepi_plus`` build (fetched by ``hw/scripts/fetch-test-firmware.sh``
into ~/.cache/edge-ota, never installed) on ``qemu-system-arm -M orangepi-pc``. The
SD image holds SPL+U-Boot at 8 KiB and a FAT partition at 1 MiB with ``boot.scr``
and ``uboot.env`` (CONFIG_ENV_IS_IN_FAT, 0x10000 bytes): U-Boot loads that env
itself, checks its CRC, and the script's ``saveenv`` writes it back. Between
boots the env lives in a host file (``mcopy`` in and out of the image) that the
agent side reads and writes through a fw_env.config, with our code and with
``fw_printenv``. QEMU cannot reset this board, so a boot ends when the slot's
boot command prints its marker, and the harness kills its own QEMU child.

Redundant mode: no QEMU-runnable Debian U-Boot is built with
CONFIG_SYS_REDUNDAND_ENVIRONMENT, so `UBootMachine(redundant=True)` keeps two
raw env copies in the SD image (as ENV_IS_IN_MMC does, fw_env.config pointing
at the image like at /dev/mmcblk0) and its board env loads them with a hush
shim: it orders the copies by U-Boot's flags rule (env_import_redund) and
imports the first one that U-Boot's own ``env import -c`` accepts (CRC check).
The script's saveenv then writes the FAT uboot.env, which the harness reads back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from hw.bootloader.uboot import UBootEnv
from hw.bootloader.uboot_env import EnvLocation, FwEnvConfig, UBootEnvStore, encode_copy

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "hw" / "scripts"
FETCH = SCRIPTS / "fetch-test-firmware.sh"
BOARD = "orangepi_plus"
FAT_ENV_SIZE = 0x10000  # CONFIG_ENV_SIZE of the orangepi_plus build
PART_OFFSET = 1024 * 1024
SD_SIZE = 64 * 1024 * 1024  # QEMU's SD model wants a power of two
RAW_ENV_OFFSETS = (0xC0000, 0xC4000)  # redundant mode: after SPL+U-Boot (ends near 0x86000)
RAW_ENV_SIZE = 0x4000
SCRIPT_ADDR = 0x43100000
BOOTNAMES = ("A", "B")

_tools_env = ("fw_printenv", "fw_setenv", "mkenvimage")
_missing_env = [t for t in _tools_env if shutil.which(t) is None]
needs_env_tools = pytest.mark.skipif(
    bool(_missing_env), reason=f"missing {', '.join(_missing_env)} (Debian packages libubootenv-tool u-boot-tools)"
)
_tools_qemu = (
    "qemu-system-arm", "mkimage", "mcopy", "mkfs.vfat", "sfdisk", "fw_printenv", "make", "apt-get", "dpkg-deb",
)
_missing_qemu = [t for t in _tools_qemu if shutil.which(t) is None]
needs_qemu_uboot = pytest.mark.skipif(
    bool(_missing_qemu),
    reason=f"missing {', '.join(_missing_qemu)} "
    "(Debian packages qemu-system-arm u-boot-tools mtools dosfstools fdisk libubootenv-tool make)",
)

_CHOSEN = re.compile(r"edge-ota: booting slot (\S+) \((.*?)\)")
_KERNEL = re.compile(r"OTA-KERNEL slot=(\S+) bootargs=\[(.*?)\]")
_SCRIPT_STARTED = b"## Executing script"
STALL_SECONDS = 12.0  # a healthy power-on reaches the script in about 1 s
_COPY = re.compile(r"OTA-ENV-COPY=(\d)")
_DONE = re.compile(rb"(OTA-KERNEL|OTA-SCRIPT-FAILED)[^\n]*\n")


# --- the real tools ---------------------------------------------------------------------


def run_tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def fw_printenv(config: Path) -> dict[str, str]:
    """Every variable as libubootenv's fw_printenv prints it (one ``name=value`` a line)."""
    out = run_tool("fw_printenv", "-c", config).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if line)


def fw_setenv(config: Path, name: str, value: str | None = None) -> None:
    run_tool("fw_setenv", "-c", config, name, *([] if value is None else [value]))


def mkenvimage(text: str, size: int, out: Path, *, redundant: bool, pad: int = 0xFF) -> bytes:
    src = out.with_suffix(".txt")
    src.write_text(text)
    run_tool("mkenvimage", *(["-r"] if redundant else []), "-p", f"{pad:#x}", "-s", f"{size:#x}", "-o", out, src)
    return out.read_bytes()


def write_config(path: Path, *copies: tuple[Path, int], size: int) -> Path:
    path.write_text(FwEnvConfig(tuple(EnvLocation(dev, off, size) for dev, off in copies)).render())
    return path


# --- U-Boot under QEMU ------------------------------------------------------------------


def firmware() -> Path:
    """The cached SPL+U-Boot image; fetched (apt-get download, dpkg-deb -x) when missing."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-ota"
    spl = cache / "u-boot-sunxi" / BOARD / "u-boot-sunxi-with-spl.bin"
    if not spl.is_file():
        proc = subprocess.run(["sh", str(FETCH)], check=False, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not spl.is_file():
            pytest.skip(f"cannot fetch the u-boot-sunxi test firmware: {proc.stderr.strip()[-300:]}")
    return spl


def build_boot_scr() -> Path:
    """hw/scripts/boot.scr, built by the project's own Makefile (mkimage -T script)."""
    run_tool("make", "-s", "-C", SCRIPTS)
    return SCRIPTS / "boot.scr"


def golden_image(directory: Path, spl: Path) -> Path:
    """A blank SD image: SPL+U-Boot at 8 KiB, a bootable FAT partition at 1 MiB."""
    img = directory / "sd-golden.img"
    with img.open("wb") as f:
        f.truncate(SD_SIZE)
    subprocess.run(["sfdisk", "-q", str(img)], input="label: dos\nstart=2048, type=c, bootable\n",
                   text=True, check=True, capture_output=True)
    with img.open("r+b") as f:
        f.seek(8 * 1024)
        f.write(spl.read_bytes())
    part = directory / "p1.img"
    run_tool("mkfs.vfat", "-C", part, str((SD_SIZE - PART_OFFSET) // 1024))
    with img.open("r+b") as f, part.open("rb") as p:
        f.seek(PART_OFFSET)
        shutil.copyfileobj(p, f)
    part.unlink()
    return img


@dataclass(frozen=True)
class Boot:
    """One power-on as seen on the serial console."""

    slot: str | None  # what boot.scr chose (None: power was cut before it said)
    reason: str
    kernel_slot: str | None  # what the slot's boot command received
    env_copy: int | None  # redundant mode: the copy (0 or 1) U-Boot imported
    bootargs: str
    seconds: float
    log: str
    retries: int = 0  # power-ons that stalled in QEMU before the script (see UBootMachine.boot)


def board_env(*, redundant: bool, bootnames: tuple[str, ...] = BOOTNAMES) -> dict[str, str]:
    """What the board itself keeps in its env: no autoboot delay, run boot.scr, and per
    slot a stand-in for "load and boot the kernel" that prints a marker."""
    env = {
        "bootdelay": "0",
        "bootcmd": f"load mmc 0:1 {SCRIPT_ADDR:#x} boot.scr && source {SCRIPT_ADDR:#x} || echo OTA-SCRIPT-FAILED",
    }
    for b in bootnames:
        env[f"ota_boot_{b}"] = f"echo OTA-KERNEL slot={b} bootargs=[${{bootargs}}]"
    if redundant:
        env["bootcmd"] = "run ota_redund_load; " + env["bootcmd"]
        env.update(_redundant_shim())
    return env


def _redundant_shim() -> dict[str, str]:
    """Hush that loads a redundant env pair from raw SD offsets the way U-Boot's
    env_import_redund picks a copy: order the copies by the flags counter (0 is newer than
    0xff; a tie goes to the first), then take the first one whose CRC U-Boot accepts.
    A redundant copy is crc|flags|data; ``env import -c`` wants crc|data, so each copy is
    rearranged in RAM first."""
    blocks = RAW_ENV_SIZE // 512
    a = (0x44000000, 0x44100000)  # copies as read
    t = (0x44200000, 0x44300000)  # copies rearranged to crc|data
    data = RAW_ENV_SIZE - 5
    cmds = ["mmc dev 0"]
    for i in (0, 1):
        cmds += [
            f"mmc read {a[i]:#x} {RAW_ENV_OFFSETS[i] // 512:#x} {blocks:#x}",
            f"cp.b {a[i]:#x} {t[i]:#x} 4",
            f"cp.b {a[i] + 5:#x} {t[i] + 4:#x} {data:#x}",
        ]
    f0, f1 = a[0] + 4, a[1] + 4
    order = (
        f"if itest.b *{f0:#x} == 0xff && itest.b *{f1:#x} == 0; then setenv ota_first_copy 1; "
        f"elif itest.b *{f1:#x} == 0xff && itest.b *{f0:#x} == 0; then setenv ota_first_copy 0; "
        f"elif itest.b *{f1:#x} > *{f0:#x}; then setenv ota_first_copy 1; "
        "else setenv ota_first_copy 0; fi"
    )
    size = RAW_ENV_SIZE - 1

    def try_copies(first: int) -> str:
        second = 1 - first
        return (
            f"if env import -c {t[first]:#x} {size:#x}; then echo OTA-ENV-COPY={first}; "
            f"elif env import -c {t[second]:#x} {size:#x}; then echo OTA-ENV-COPY={second}; "
            "else echo OTA-NO-VALID-COPY; fi"
        )

    imp = f'if test "${{ota_first_copy}}" = 1; then {try_copies(1)}; else {try_copies(0)}; fi; setenv ota_first_copy'

    return {"ota_redund_load": "; ".join([*cmds, order, imp])}


class UBootMachine:
    """One orangepi-pc with an SD card; `env` is the agent's view of its U-Boot env."""

    def __init__(self, workdir: Path, golden: Path, spl: Path, boot_scr: Path, *, redundant: bool = False,
                 bootnames: tuple[str, ...] = BOOTNAMES) -> None:
        self.workdir = workdir
        self.redundant = redundant
        self.image = workdir / "sd.img"
        subprocess.run(["cp", "--sparse=always", str(golden), str(self.image)], check=True)
        run_tool("mcopy", "-o", "-i", f"{self.image}@@{PART_OFFSET}", boot_scr, "::boot.scr")
        self.fat_env = workdir / "uboot.env"  # host copy of the FAT env (what saveenv writes)
        self.fat_config = write_config(workdir / "fw_env.config", (self.fat_env, 0), size=FAT_ENV_SIZE)
        self.board = board_env(redundant=redundant, bootnames=bootnames)
        if redundant:
            # The agent's env: two raw copies in the SD image itself, as on /dev/mmcblk0.
            copies = [(self.image, off) for off in RAW_ENV_OFFSETS]
            self.config = write_config(workdir / "fw_env-redund.config", *copies, size=RAW_ENV_SIZE)
            self._write_raw_blank()
            UBootEnvStore(self.fat_config).create(self.board)
            self.board_blob = self.fat_env.read_bytes()
        else:
            self.config = self.fat_config
            UBootEnvStore(self.config).create(self.board)
        self.env = UBootEnv(self.config, bootnames)

    def _write_raw_blank(self) -> None:
        with self.image.open("r+b") as f:
            for off in RAW_ENV_OFFSETS:
                f.seek(off)
                f.write(bytes(RAW_ENV_SIZE))

    def init_env(self, variables: Mapping[str, str]) -> None:
        """Redundant mode: put a first valid copy (flags 1) in place holding ``variables``."""
        with self.image.open("r+b") as f:
            f.seek(RAW_ENV_OFFSETS[0])
            f.write(encode_copy(variables, RAW_ENV_SIZE, redundant=True, flags=1))

    def push(self) -> None:
        if self.redundant:
            self.fat_env.write_bytes(self.board_blob)  # the board env stays as the board had it
        run_tool("mcopy", "-o", "-i", f"{self.image}@@{PART_OFFSET}", self.fat_env, "::uboot.env")

    def pull(self) -> None:
        run_tool("mcopy", "-o", "-i", f"{self.image}@@{PART_OFFSET}", "::uboot.env", self.fat_env)

    def boot(self, *, cut_after: float | None = None, cut_at: str | None = None, timeout: float = 30.0) -> Boot:
        """Power on, let boot.scr choose, stop when the slot's boot command runs. A power
        cut instead: ``cut_after`` seconds, or as soon as the console shows ``cut_at``.
        The host env file is updated afterwards.

        Now and then (about 1 power-on in 80 on a loaded 2-core machine) QEMU stalls before
        U-Boot gets to the script: no output at all, or none after the SPL banner. Nothing
        is written before the script runs, so such a power-on is a power cut before the
        bootloader did anything; it is retried (at most twice) and counted in ``retries``."""
        self.push()
        retries = 0
        while True:
            buf, seconds, stalled = self._power_on(cut_after, cut_at.encode() if cut_at else None, timeout)
            if not stalled:
                break
            retries += 1
            if retries > 2:
                raise AssertionError(f"QEMU stalled before boot.scr three times:\n{_text(buf)[-3000:]}")
        self.pull()
        log = _text(buf)
        if "OTA-SCRIPT-FAILED" in log:
            raise AssertionError(f"boot.scr failed:\n{log[-3000:]}")
        if cut_after is None and cut_at is None and not _DONE.search(buf):
            raise AssertionError(f"U-Boot did not reach a slot within {timeout}s:\n{log[-3000:]}")
        chosen, kernel, copy = _CHOSEN.search(log), _KERNEL.search(log), _COPY.search(log)
        return Boot(
            slot=chosen.group(1) if chosen else None,
            reason=chosen.group(2) if chosen else "",
            kernel_slot=kernel.group(1) if kernel else None,
            bootargs=kernel.group(2) if kernel else "",
            env_copy=int(copy.group(1)) if copy else None,
            seconds=seconds,
            log=log,
            retries=retries,
        )

    def _power_on(self, cut_after: float | None, cut_at: bytes | None, timeout: float) -> tuple[bytes, float, bool]:
        """Run QEMU until the kernel marker, the cut, or the timeout. Returns the console
        output, the seconds it ran, and whether it stalled before the script started."""
        cutting = cut_after is not None or cut_at is not None
        cmd = ["qemu-system-arm", "-M", "orangepi-pc", "-nographic", "-nic", "none", "-no-reboot",
               "-drive", f"if=sd,format=raw,file={self.image}"]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        buf = b""
        deadline = start + (cut_after if cut_after is not None else timeout)
        stalled = False
        try:
            while (now := time.monotonic()) < deadline:
                chunk = proc.stdout.read()
                if chunk:
                    buf += chunk
                    if cut_at is not None and cut_at in buf:
                        break
                    if not cutting and _DONE.search(buf):
                        break
                elif proc.poll() is not None:
                    break
                elif not cutting and now - start > STALL_SECONDS and _SCRIPT_STARTED not in buf:
                    stalled = True
                    break
                else:
                    time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            buf += proc.stdout.read() or b""
            proc.stdout.close()
        return buf, time.monotonic() - start, stalled


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\r", "")
