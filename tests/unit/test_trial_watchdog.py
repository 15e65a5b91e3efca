"""The early trial watchdog's loop (agent/trialwatch.py) on the simulated
hardware: a SimWatchdog file and a simulated bootloader file, on a virtual
clock. Every way a trial boot can end before boot-check (taken over, never
taken over, bootloader state unreadable, watchdog device late) leaves the
watchdog either handed over running or unfed past the deadline, so the board
resets; a committed boot is released with the magic close."""

from __future__ import annotations

from pathlib import Path

from agent.config import WatchdogConfig
from agent.trialwatch import GuardOutcome, GuardResult, feed_interval, guard
from hw.bootloader import model
from hw.bootloader.chooser import Bootloader
from hw.bootloader.simenv import SimEnv
from hw.watchdog import SimWatchdog

BASE = 1_000_000.0
CFG = WatchdogConfig("sim", Path("."), timeout=30, trial_deadline=300, handover_timeout=120)


class VirtualBoot:
    """Seconds since boot, advanced by the guard's own waits; `takeover_at`: when
    boot-check asks for the watchdog (None: never); `at` runs a step at a time."""

    def __init__(self, takeover_at: float | None = None) -> None:
        self.now = 0.0
        self.takeover_at = takeover_at
        self.waits: list[float] = []
        self.events: list[tuple[float, object]] = []

    def uptime(self) -> float:
        return self.now

    def clock(self) -> float:
        return BASE + self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        target = self.now + seconds
        for when, action in sorted(self.events, key=lambda e: e[0]):
            if self.now < when <= target:
                action()  # type: ignore[operator]
        if self.takeover_at is not None and target >= self.takeover_at:
            self.now = max(self.now, self.takeover_at)
            return True
        self.now = target
        return False


def _device(tmp_path: Path, *, trial: bool) -> tuple[Bootloader, Path]:
    env = SimEnv(tmp_path / "bootloader.json", ("A", "B"))
    env.create()
    state = env.load()
    cmdline = tmp_path / "cmdline"
    if trial:
        state, decision = model.choose(model.set_primary(state, "B", 3))
        cmdline.write_text(f"ota.slot={decision.slot}\n")
    else:
        cmdline.write_text("ota.slot=A\n")
    env.store(state)
    return Bootloader(env, cmdline), tmp_path / "wd"


def _run(
    tmp_path: Path, boot: VirtualBoot, bl: Bootloader, cfg: WatchdogConfig = CFG
) -> tuple[GuardResult, SimWatchdog]:
    (tmp_path / "wd").mkdir(exist_ok=True)
    dog = SimWatchdog(tmp_path / "wd", clock=boot.clock)
    return guard(cfg, bl, dog, uptime=boot.uptime, wait=boot.wait), dog


def test_a_committed_boot_is_never_armed(tmp_path: Path) -> None:
    bl, _ = _device(tmp_path, trial=False)
    boot = VirtualBoot()
    result, dog = _run(tmp_path, boot, bl)
    assert result.outcome is GuardOutcome.RELEASED
    assert "slot A is not on trial: watchdog left alone" in result.reason
    assert not dog.path.exists()  # never armed
    assert boot.waits == []
    assert not dog.expired(BASE + 10 * 86400)  # never resets this boot


def test_a_trial_boot_is_fed_until_boot_check_takes_the_watchdog_over(tmp_path: Path) -> None:
    bl, _ = _device(tmp_path, trial=True)
    boot = VirtualBoot(takeover_at=95.0)
    result, dog = _run(tmp_path, boot, bl)
    assert result.outcome is GuardOutcome.HANDED_OVER
    rec = dog.record()
    assert rec.armed is True  # handed over running: boot-check must open it in time
    assert rec.last_keepalive == BASE + 95.0  # fed once more at the hand-over
    assert rec.timeout_s == CFG.handover_timeout  # time for boot-check's Python to start
    assert "must open it within 120 s" in result.reason
    assert not dog.expired(BASE + 95.0 + CFG.handover_timeout)
    assert dog.expired(BASE + 95.0 + CFG.handover_timeout + 0.1)  # boot-check never opening it: reset
    assert max(boot.waits) == feed_interval(CFG) < CFG.timeout


def test_a_trial_boot_that_never_reaches_boot_check_is_reset_after_the_deadline(tmp_path: Path) -> None:
    bl, _ = _device(tmp_path, trial=True)
    boot = VirtualBoot(takeover_at=None)
    result, dog = _run(tmp_path, boot, bl)
    assert result.outcome is GuardOutcome.EXPIRED
    assert "trial boot of slot B" in result.reason
    assert "within 300 s" in result.reason
    assert "trial_deadline" in result.reason
    rec = dog.record()
    assert rec.armed is True
    assert CFG.trial_deadline - feed_interval(CFG) <= rec.last_keepalive - BASE <= CFG.trial_deadline
    deadline = dog.deadline()
    assert deadline is not None
    assert deadline <= BASE + CFG.trial_deadline + CFG.timeout
    assert dog.expired(BASE + CFG.trial_deadline + CFG.timeout + 1)


def test_an_unreadable_bootloader_state_is_asked_again_until_it_can_be_read(tmp_path: Path) -> None:
    bl, _ = _device(tmp_path, trial=False)
    saved = (tmp_path / "bootloader.json").read_bytes()
    (tmp_path / "bootloader.json").unlink()  # its partition is not mounted yet
    boot = VirtualBoot()
    boot.events.append((40.0, lambda: (tmp_path / "bootloader.json").write_bytes(saved)))
    result, dog = _run(tmp_path, boot, bl)
    assert result.outcome is GuardOutcome.RELEASED
    assert "watchdog released" in result.reason  # armed while unknown, then the magic close
    assert dog.record().armed_at == 0.0  # disarmed record
    assert dog.record().armed is False
    assert 40.0 <= boot.now < 40.0 + feed_interval(CFG) + 0.01


def test_a_bootloader_state_unreadable_until_the_deadline_counts_as_a_trial(tmp_path: Path) -> None:
    bl, _ = _device(tmp_path, trial=False)
    (tmp_path / "bootloader.json").unlink()
    boot = VirtualBoot()
    result, dog = _run(tmp_path, boot, bl)
    assert result.outcome is GuardOutcome.EXPIRED
    assert "bootloader state unknown" in result.reason
    assert dog.expired(BASE + CFG.trial_deadline + CFG.timeout + 1)


def test_a_watchdog_device_that_appears_late_is_armed_when_it_appears(tmp_path: Path) -> None:
    bl, _ = _device(tmp_path, trial=True)
    boot = VirtualBoot(takeover_at=120.0)
    late = tmp_path / "late-wd"  # the driver has not made the device yet
    boot.events.append((12.0, late.mkdir))
    dog = SimWatchdog(late, clock=boot.clock)
    result = guard(CFG, bl, dog, uptime=boot.uptime, wait=boot.wait)
    assert result.outcome is GuardOutcome.HANDED_OVER
    assert 12.0 <= dog.record().armed_at - BASE <= 13.0
    assert dog.record().armed is True


def test_a_watchdog_that_never_appears_is_reported_at_the_deadline(tmp_path: Path) -> None:
    bl, _ = _device(tmp_path, trial=True)
    boot = VirtualBoot()
    dog = SimWatchdog(tmp_path / "never", clock=boot.clock)
    result = guard(CFG, bl, dog, uptime=boot.uptime, wait=boot.wait)
    assert result.outcome is GuardOutcome.NO_WATCHDOG
    assert "not armed by the trial deadline (300 s after boot)" in result.reason
    assert "cannot write" in result.reason


def test_no_watchdog_configured_does_nothing(tmp_path: Path) -> None:
    bl, _ = _device(tmp_path, trial=True)
    boot = VirtualBoot()
    result, dog = _run(tmp_path, boot, bl, WatchdogConfig("none", Path("."), 30, 300, 120))
    assert result.outcome is GuardOutcome.NO_WATCHDOG
    assert boot.waits == []
    assert dog.deadline() is None
