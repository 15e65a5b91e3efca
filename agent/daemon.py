"""The composition root of the device: builds a `Device` (config, bootloader,
state, events, clock, watchdog, health checker, slot writers and read-back) from
a config file. Everything else receives these objects; nothing
else constructs backends."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from agent import config as config_mod
from agent.config import Config
from agent.errors import ConfigError
from agent.events import Clock, Event, utcnow
from agent.health import HealthChecker, run_checks
from agent.outbox import EventLog
from agent.state import AgentState, StateStore
from bundler.format.signing import Keyring
from hw.bootloader import open_env
from hw.bootloader.chooser import Bootloader
from hw.readback import OverlappedReadBack, ReadBackOpener
from hw.slot import SlotOpener, SlotWriter
from hw.watchdog import Watchdog, open_watchdog
from ota_common.fsutil import ensure_private_dir


@dataclass(frozen=True, slots=True)
class Device:
    config: Config
    bootloader: Bootloader
    store: StateStore
    events: EventLog
    clock: Clock
    watchdog: Watchdog
    health: HealthChecker = run_checks  # the configured checks -> their verdict
    open_slot: SlotOpener = SlotWriter  # (path, bootname, booted=, booted_paths=) -> a writer
    read_back: ReadBackOpener = OverlappedReadBack  # (path, bootname, length) -> reads back while writing

    def keyring(self) -> Keyring:
        return Keyring.load(self.config.keyring)

    def record(self, event: Event, state: AgentState | None = None) -> Event:
        """Emit an event to log and outbox, and save it as the last result, together
        with `state` when the caller changed the state too (one atomic write)."""
        event = self.events.emit(event)
        self.store.save(replace(state or self.store.load(), last_result=event))
        return event


def build_device(config_path: Path, clock: Clock = utcnow) -> Device:
    cfg = config_mod.load(config_path)
    try:
        # Only the agent may change its state directory: anyone else could plant
        # links or files there for it to trust or write through.
        ensure_private_dir(cfg.state_dir)
    except OSError as e:
        raise ConfigError(str(cfg.state_dir), "", f"unsafe state directory: {e.strerror}") from None
    env = open_env(cfg.bootloader, cfg.bootloader_path, cfg.bootnames)
    events = EventLog(cfg.state_dir, clock)
    return Device(
        config=cfg,
        bootloader=Bootloader(env, cfg.cmdline),
        store=StateStore(cfg.state_dir, events),
        events=events,
        clock=clock,
        watchdog=open_watchdog(cfg.watchdog.backend, cfg.watchdog.path),
    )
