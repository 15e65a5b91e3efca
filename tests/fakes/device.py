"""A device for unit tests of the core: the real `Device` (state store, outbox,
bootloader rules) over an in-memory bootloader environment, a kernel command
line file, a fixed clock, no watchdog and slot files in a temp directory. The
counting rules are the shared ones in hw.bootloader.model; nothing is mocked
but the storage of the bootloader state."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from agent import config as config_mod
from agent.daemon import Device
from agent.outbox import EventLog
from agent.state import StateStore
from hw.bootloader.chooser import Bootloader
from hw.bootloader.model import BootState
from hw.watchdog import NoWatchdog

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@dataclass
class MemoryEnv:
    """A BootEnv that keeps the state in memory."""

    bootnames: tuple[str, ...]
    name: str = "memory"
    state: BootState | None = None
    stores: int = 0

    def create(self) -> None:
        self.store(BootState.initial(self.bootnames))

    def load(self) -> BootState:
        assert self.state is not None, "create() first"
        return self.state

    def store(self, state: BootState) -> None:
        self.state = state
        self.stores += 1


@dataclass
class FakeDevice:
    device: Device
    env: MemoryEnv
    cmdline: Path
    slots: dict[str, Path] = field(default_factory=dict)
    reboots: int = 0

    def boot_into(self, bootname: str) -> None:
        self.cmdline.write_text(f"ota.slot={bootname}\n")

    def rebooter(self) -> None:
        self.reboots += 1


def fake_device(tmp_path: Path, *, bootnames: tuple[str, ...] = ("A", "B"), health: str = "[]") -> FakeDevice:
    slots = {b: tmp_path / f"slot-{b}.img" for b in bootnames}
    for path in slots.values():
        path.write_bytes(bytes(1 << 16))
    (tmp_path / "keys").mkdir(exist_ok=True)
    slot_tables = "".join(f'[[slots]]\nbootname = "{b}"\npath = "{p.name}"\n' for b, p in slots.items())
    config = tmp_path / "agent.toml"
    config.write_text(textwrap.dedent(f"""\
        [device]
        compatible = "unit-board"
        state_dir = "state"
        keyring = "keys"
        cmdline = "cmdline"
        [bootloader]
        backend = "sim"
        path = "bootloader.json"
        tries = 3
        [health]
        deadline = 5
        commands = {health}
        """) + slot_tables)
    cfg = config_mod.load(config)
    env = MemoryEnv(bootnames)
    env.create()
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"ota.slot={bootnames[0]}\n")
    events = EventLog(cfg.state_dir, lambda: NOW)
    device = Device(
        config=cfg,
        bootloader=Bootloader(env, cmdline),
        store=StateStore(cfg.state_dir, events),
        events=events,
        clock=lambda: NOW,
        watchdog=NoWatchdog(),
    )
    return FakeDevice(device, env, cmdline, slots)
