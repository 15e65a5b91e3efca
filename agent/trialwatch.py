"""The early trial watchdog (`ota-agent trial-watchdog`, run from early boot by
systemd/ota-trial-watchdog.service): it covers a trial boot from the moment
systemd starts to the moment ota-boot-check.service takes the hardware
watchdog over, so that a boot which hangs before the health checks run (a unit
that blocks, a mount that never comes, PID 1 or the kernel stuck) ends in a
reset the bootloader's try counter counts, like a hang during them.

It asks the bootloader whether the booted slot is on trial; while it cannot
tell, and in a trial, it arms the watchdog as soon as the device exists and
feeds it:

* not on trial (committed, or bad and booted for want of another): it leaves the
  watchdog alone, or disarms it (magic close) if it armed it before it could
  tell; a committed boot is never reset by it;
* on trial: it feeds the watchdog until boot-check takes it over, or until
  [watchdog] trial_deadline seconds after the kernel started. Boot-check's unit
  stops this one before it starts (ExecStartPre): the timeout set to [watchdog]
  handover_timeout, one last keepalive, then close without the magic character,
  so the hardware keeps counting and boot-check must open it within that time
  (its Python starting on a slow board included). At the deadline it stops
  feeding and the board resets;
* the bootloader's state cannot be read yet (its partition not mounted): asked
  again at every tick; still unknown at the deadline, the boot is treated as a
  trial and reset.

If this process hangs, or the kernel does, nothing feeds the watchdog: a reset
after [watchdog] timeout. It needs only the config, the bootloader and the
watchdog, not the state directory (which may not be mounted yet).

Time comes from the caller: `uptime()` (seconds since the kernel started) and
`wait(seconds)` (True: we are asked to hand over). The simulated device runs
the same loop on a virtual clock.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import config as config_mod
from agent.config import WatchdogConfig
from hw.bootloader import open_env
from hw.bootloader.chooser import Bootloader
from hw.bootloader.model import SlotBootState
from hw.errors import WatchdogError
from hw.watchdog import Watchdog, open_watchdog
from ota_common.errors import OtaError

log = logging.getLogger(__name__)

Uptime = Callable[[], float]
Wait = Callable[[float], bool]
ARM_RETRY_S = 1.0  # how often a missing watchdog device (its driver not loaded yet) is looked for


class GuardOutcome(enum.Enum):
    NO_WATCHDOG = "no-watchdog"  # none configured, or it could not be armed
    RELEASED = "released"  # not a trial boot: disarmed with the magic close
    HANDED_OVER = "handed-over"  # still running, for boot-check to open within the timeout
    EXPIRED = "expired"  # the trial deadline passed: no longer fed, the board resets


@dataclass(frozen=True, slots=True)
class GuardResult:
    outcome: GuardOutcome
    reason: str


def feed_interval(cfg: WatchdogConfig) -> float:
    return max(min(cfg.timeout / 3, 5.0), 0.5)


def _trial_slot(bootloader: Bootloader) -> tuple[str, bool]:
    """The booted slot and whether it is on trial (raises OtaError while unreadable)."""
    booted = bootloader.booted_slot()
    return booted, bootloader.state().slots[booted].state is SlotBootState.TRIAL


def guard(
    cfg: WatchdogConfig, bootloader: Bootloader, watchdog: Watchdog, *, uptime: Uptime, wait: Wait
) -> GuardResult:
    if cfg.backend == "none":
        return GuardResult(GuardOutcome.NO_WATCHDOG, 'no watchdog configured ([watchdog] backend = "none")')
    deadline = cfg.trial_deadline
    try:  # a committed boot whose bootloader state is readable now is never armed at all
        booted, trial = _trial_slot(bootloader)
    except OtaError:
        trial = True  # unknown yet: arm first, ask again below
    if not trial:
        return GuardResult(GuardOutcome.RELEASED, f"slot {booted} is not on trial: watchdog left alone")
    problem = ""
    while True:  # arm it as soon as its driver made the device
        try:
            watchdog.start(cfg.timeout)
            break
        except WatchdogError as e:
            if str(e) != problem:
                log.warning("%s; trying again", e)
            problem = str(e)
        if uptime() >= deadline:
            reason = f"watchdog not armed by the trial deadline ({deadline} s after boot): {problem}"
            return GuardResult(GuardOutcome.NO_WATCHDOG, reason)
        if wait(ARM_RETRY_S):
            return GuardResult(GuardOutcome.NO_WATCHDOG, f"stopped before the watchdog could be armed: {problem}")

    interval = feed_interval(cfg)
    slot: str | None = None
    problem = ""
    while True:
        if slot is None:
            try:
                booted, trial = _trial_slot(bootloader)
            except OtaError as e:
                if str(e) != problem:
                    log.warning("cannot tell whether this is a trial boot yet: %s", e)
                problem = str(e)
            else:
                if not trial:
                    watchdog.stop()
                    return GuardResult(GuardOutcome.RELEASED, f"slot {booted} is not on trial: watchdog released")
                slot = booted
                log.info("trial boot of slot %s: feeding the watchdog until boot-check takes it over, "
                         "at most %d s after boot", slot, deadline)
        if uptime() >= deadline:
            what = f"the trial boot of slot {slot}" if slot else f"this boot (bootloader state unknown: {problem})"
            reason = (
                f"{what} did not reach boot-check within {deadline} s ([watchdog] trial_deadline): "
                "no longer feeding the watchdog, it resets the board"
            )
            log.error("%s", reason)
            return GuardResult(GuardOutcome.EXPIRED, reason)
        if wait(interval):
            watchdog.hand_over(cfg.handover_timeout)
            reason = (f"the running watchdog is handed over to boot-check, which must open it within "
                      f"{cfg.handover_timeout} s")
            return GuardResult(GuardOutcome.HANDED_OVER, reason)
        watchdog.keepalive()


def uptime() -> float:
    """Seconds since the kernel started (CLOCK_BOOTTIME: counts suspended time too)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def run(config_path: Path) -> int:
    """The unit's process: guard this boot; SIGTERM (systemd stopping the unit for
    boot-check, or at shutdown) hands the watchdog over. Exit 0 unless the deadline
    passed; then it keeps the device open, unfed, until the reset (or SIGTERM)."""
    cfg = config_mod.load(config_path)
    bootloader = Bootloader(open_env(cfg.bootloader, cfg.bootloader_path, cfg.bootnames), cfg.cmdline)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    result = guard(cfg.watchdog, bootloader, open_watchdog(cfg.watchdog.backend, cfg.watchdog.path),
                   uptime=uptime, wait=stop.wait)
    if result.outcome is not GuardOutcome.EXPIRED:  # (that one guard() has logged)
        log.info("%s", result.reason)
    if result.outcome is GuardOutcome.EXPIRED:
        stop.wait()  # closing now would stop a driver without the magic close
        return 1
    return 0
