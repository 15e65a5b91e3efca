"""The simulated device: two slot files, a bootloader state (the simulator's
own JSON, or a real U-Boot environment, grubenv or BLS entry directory), the
kernel command line as a file, and the agent's config — all in one directory.

`init()` creates it; `power_on()` is one power-on: the simulated firmware
applies the shared counting rules (hw.bootloader.model.choose) to the stored
state, writes the command line the boot script would pass, then runs what the
device runs at boot: the early trial watchdog (agent/trialwatch.py, on a
virtual clock: boot-check takes the watchdog over BOOT_CHECK_AT seconds after
power-on, or never when the boot blocks) and boot-check, rebooting as long as
boot-check asks for it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.bootcheck import BootCheckOutcome, HealthOverride, Outcome, boot_check
from agent.config import MAX_TRIES
from agent.crashpoint import crashpoint
from agent.daemon import Device, build_device
from agent.errors import InstallError
from agent.mqtt.config import load_mqtt
from agent.state import AgentState, SlotRecord, StateStore
from agent.trialwatch import GuardOutcome, GuardResult, guard
from bundler.format.signing import Keyring
from hw.bootloader import model, open_env
from hw.slot import file_sha256
from hw.watchdog import SimWatchdog
from ota_common.fsutil import atomic_write

BOOTNAMES = ("A", "B")
MAX_BOOTS = 20
ENV_PATHS = {"sim": "bootloader.json", "uboot": "fw_env.config", "grub": "grubenv", "bls": "boot"}
UBOOT_ENV_SIZE = 0x4000
BOOT_CHECK_AT = 20.0  # virtual seconds from power-on until boot-check starts (when nothing blocks)


@dataclass(frozen=True, slots=True)
class SimSpec:
    directory: Path
    image: Path
    keyring: Path
    compatible: str
    tries: int = 3
    bootloader: str = "sim"
    version: str = "factory"
    slot_size: int = 0  # 0: twice the image, at least 64 MiB
    mqtt: str | None = None  # broker URL: write an [mqtt] table (with device_id) for `ota-agent run`
    device_id: str | None = None
    groups: tuple[str, ...] = ()


def config_path(directory: Path) -> Path:
    return directory / "agent.toml"


def init(spec: SimSpec) -> Path:
    d = spec.directory
    if config_path(d).exists():
        raise InstallError(f"{d} already holds a simulated device (agent.toml exists)")
    if not 1 <= spec.tries <= MAX_TRIES:
        raise InstallError(f"tries {spec.tries} is outside 1..{MAX_TRIES}")
    if spec.bootloader not in ENV_PATHS:
        raise InstallError(f"unknown bootloader {spec.bootloader!r}; choose one of {', '.join(ENV_PATHS)}")
    Keyring.load(spec.keyring)  # refuse a broken keyring now, not at first install
    mqtt = _mqtt_table(spec)  # and a broker setting the agent would refuse
    d.mkdir(parents=True, exist_ok=True)
    keys = d / "keys"
    keys.mkdir(exist_ok=True)
    for pub in sorted(spec.keyring.glob("*.pub")) if spec.keyring.is_dir() else [spec.keyring]:
        shutil.copyfile(pub, keys / pub.name)
    image_size = spec.image.stat().st_size
    size = spec.slot_size or max(2 * image_size, 64 << 20)
    size = -(-size // (1 << 20)) * (1 << 20)
    if size < image_size:
        raise InstallError(f"slot size {size} is smaller than the image ({image_size} bytes)")
    digest = file_sha256(spec.image, "image")
    for b in BOOTNAMES:
        slot = d / f"slot-{b}.img"
        shutil.copyfile(spec.image, slot)
        with slot.open("r+b") as f:
            f.truncate(size)
    env_path = d / ENV_PATHS[spec.bootloader]
    if spec.bootloader == "uboot":
        _write_fw_env_config(d, env_path)
    env = open_env(spec.bootloader, env_path, BOOTNAMES)
    env.create()
    _set_cmdline(d / "cmdline", BOOTNAMES[0])
    config_path(d).write_text(_config_text(spec, ENV_PATHS[spec.bootloader]) + mqtt)
    records = {b: SlotRecord(spec.version, digest, 0, None) for b in BOOTNAMES}
    StateStore(d / "state").save(AgentState(slots=records))
    return config_path(d)


def _mqtt_table(spec: SimSpec) -> str:
    """The `[mqtt]` table for `--mqtt URL --device-id ID [--group G ...]`, checked as the agent will."""
    if spec.mqtt is None and spec.device_id is None and not spec.groups:
        return ""
    if spec.mqtt is None or spec.device_id is None:
        raise InstallError("--mqtt and --device-id go together (--group needs both)")
    table = {"broker": spec.mqtt, "device_id": spec.device_id, "groups": list(spec.groups),
             "reconnect_min": 1, "reconnect_max": 10, "reboot_after_install": True}
    load_mqtt(table, config_path(spec.directory))
    return f"""
[mqtt]
# Jobs and reports over a broker (docs/mqtt.md): `ota-agent -c THIS_FILE run`, then `ota-fleet`.
broker = {json.dumps(spec.mqtt)}
device_id = {json.dumps(spec.device_id)}
groups = {json.dumps(list(spec.groups))}
reconnect_min = 1
reconnect_max = 10
# After an install job, reboot to try the new slot (here: the simulated power cycle, in-process).
reboot_after_install = true
"""


def _set_cmdline(path: Path, slot: str) -> None:
    """What the shipped boot scripts put on the kernel command line."""
    atomic_write(path, f"ota.slot={slot} rauc.slot={slot}\n".encode())


def _write_fw_env_config(d: Path, config: Path) -> None:
    env_file = (d / "uboot.env").resolve()
    config.write_text(
        "# device offset size: two redundant copies in one file\n"
        f"{env_file} 0x0000 {UBOOT_ENV_SIZE:#x}\n"
        f"{env_file} {UBOOT_ENV_SIZE:#x} {UBOOT_ENV_SIZE:#x}\n"
    )


def _config_text(spec: SimSpec, env_path: str) -> str:
    # json.dumps quotes the compatible string as a valid TOML basic string.
    slots = "".join(f'\n[[slots]]\nbootname = "{b}"\nclass = "rootfs"\npath = "slot-{b}.img"\n' for b in BOOTNAMES)
    return f"""# Simulated edge-ota device (ota-agent sim init). Paths are relative to this file.
[device]
compatible = {json.dumps(spec.compatible)}
state_dir = "state"
keyring = "keys"
cmdline = "cmdline"

[bootloader]
backend = "{spec.bootloader}"
path = "{env_path}"
tries = {spec.tries}
# The simulator's reboot: `ota-agent run` performs this power cycle itself.
reboot_command = {json.dumps(["ota-agent", "sim", "boot", str(spec.directory.resolve())])}
{slots}
[health]
deadline = 30
commands = []

[watchdog]
backend = "sim"
path = "."
timeout = 30

[api]
# The local API of `ota-agent run`; the CLI talks to a running daemon through it.
socket = "agent.sock"
mode = "0660"
"""


@dataclass(frozen=True, slots=True)
class BootRecord:
    slot: str
    reason: str
    check: BootCheckOutcome


def power_on(
    directory: Path, *, health: HealthOverride | None = None, say: Callable[[str], None] = print
) -> list[BootRecord]:
    """Boot until the device settles (boot-check asks for no further reboot)."""
    device = build_device(config_path(directory))
    env = device.bootloader.env
    watchdog = device.watchdog if isinstance(device.watchdog, SimWatchdog) else None
    if health in (HealthOverride.HANG, HealthOverride.BLOCK) and watchdog is None:
        raise InstallError(f"--health {health.value} needs the simulated watchdog ([watchdog] backend = \"sim\")")
    boots: list[BootRecord] = []
    hang_end: float | None = None
    for n in range(1, MAX_BOOTS + 1):
        reset = watchdog.power_on(hang_end) if watchdog else False
        hang_end = None
        state, decision = model.choose(env.load())
        env.store(state)
        _set_cmdline(device.config.cmdline, decision.slot)
        after = ", after a watchdog reset" if reset else ""
        early = _early_boot(device, watchdog, blocked=health is HealthOverride.BLOCK)
        if early is not None and early.outcome is not GuardOutcome.RELEASED and health is HealthOverride.BLOCK:
            hung = f"the boot blocked before boot-check; {early.reason}"
            boots.append(BootRecord(decision.slot, decision.reason,
                                    BootCheckOutcome(Outcome.HUNG, decision.slot, hung, booted_good=False)))
            say(f"boot {n}: slot {decision.slot} ({decision.reason}{after}); {hung}")
            deadline = watchdog.deadline() if watchdog is not None else None
            if early.outcome is not GuardOutcome.EXPIRED or deadline is None:
                raise InstallError(f"boot {n} of slot {decision.slot} blocked and nothing resets it: {early.reason}")
            hang_end = deadline + 1.0
            say(f"        the watchdog was not fed for {device.config.watchdog.timeout}s: it resets the board")
            continue
        outcome = boot_check(device, health=None if health is HealthOverride.BLOCK else health)
        boots.append(BootRecord(decision.slot, decision.reason, outcome))
        say(f"boot {n}: slot {decision.slot} ({decision.reason}{after}); boot-check: {outcome.reason}")
        if outcome.outcome is Outcome.HUNG and watchdog is not None:
            deadline = watchdog.deadline()
            hang_end = (deadline if deadline is not None else 0.0) + 1.0  # the board hangs until the watchdog fires
            say(f"        the watchdog was not fed for {device.config.watchdog.timeout}s: it resets the board")
            continue
        if not outcome.reboot:
            return boots
        crashpoint("before-reboot")
    raise InstallError(f"device did not settle within {MAX_BOOTS} boots")


def _early_boot(device: Device, watchdog: SimWatchdog | None, *, blocked: bool) -> GuardResult | None:
    """The early trial watchdog of one boot, on a virtual clock that starts at
    power-on: boot-check takes the watchdog over at BOOT_CHECK_AT, never when the
    boot is `blocked`. None without the simulated watchdog."""
    if watchdog is None:
        return None
    base = watchdog.clock()
    elapsed = 0.0

    def uptime() -> float:
        return elapsed

    def wait(seconds: float) -> bool:
        nonlocal elapsed
        if not blocked and elapsed + seconds >= BOOT_CHECK_AT:
            elapsed = max(elapsed, BOOT_CHECK_AT)
            return True
        elapsed += seconds
        return False

    virtual = SimWatchdog(watchdog.path.parent, clock=lambda: base + elapsed)
    return guard(device.config.watchdog, device.bootloader, virtual, uptime=uptime, wait=wait)
