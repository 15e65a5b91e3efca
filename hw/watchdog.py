"""Hardware watchdog: the `Watchdog` interface, the Linux ``/dev/watchdog``
driver (`DevWatchdog`, the kernel's ioctl API through fcntl), its simulated
twin (`SimWatchdog`, a JSON file plus a clock) and a no-op for devices without one.

This module owns arming, feeding, handing over and magic-closing a watchdog and
telling a watchdog reset from a power cut (``WDIOC_GETBOOTSTATUS`` & ``WDIOF_CARDRESET``).
It does not own *when* to feed (the agent's main loop does) nor systemd's
service watchdog (``hw/sdnotify.py``). Every OSError becomes `WatchdogError`
naming the device.

Linux API (Documentation/watchdog/watchdog-api.rst): opening the device arms
it; any write or ``WDIOC_KEEPALIVE`` feeds it; writing ``'V'`` right before
close() disarms it when the driver has ``WDIOF_MAGICCLOSE`` (never with
``CONFIG_WATCHDOG_NOWAYOUT``); closing without it leaves it running, so the
board resets when the timeout passes. That is also how one process hands the
running watchdog to the next (`hand_over`): the next opener has the timeout to
take it over, and nobody taking it over is a reset.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from hw.errors import WatchdogError
from ota_common.fsutil import atomic_write, read_regular

Clock = Callable[[], float]


# -- ioctl numbers (include/uapi/linux/watchdog.h, asm-generic/ioctl.h) ------------


def _ioc_layout(machine: str) -> tuple[int, int, int]:
    """(size bits, read flag, write flag): asm-generic everywhere except the
    architectures that define their own <asm/ioctl.h>."""
    if machine.startswith(("mips", "ppc", "powerpc", "sparc", "alpha")):
        return 13, 2, 4
    return 14, 2, 1


_SIZEBITS, _IOC_READ, _IOC_WRITE = _ioc_layout(platform.machine())


def _ioc(direction: int, nr: int, size: int, type_: int = ord("W")) -> int:
    if not 0 <= size < (1 << _SIZEBITS):
        raise ValueError(f"ioctl argument size {size} too large")
    return (direction << (16 + _SIZEBITS)) | (size << 16) | (type_ << 8) | nr


_INT = struct.Struct("=i")
WATCHDOG_INFO = struct.Struct("=II32s")  # options, firmware_version, identity[32]

WDIOC_GETSUPPORT = _ioc(_IOC_READ, 0, WATCHDOG_INFO.size)
WDIOC_GETSTATUS = _ioc(_IOC_READ, 1, _INT.size)
WDIOC_GETBOOTSTATUS = _ioc(_IOC_READ, 2, _INT.size)
WDIOC_SETOPTIONS = _ioc(_IOC_READ, 4, _INT.size)
WDIOC_KEEPALIVE = _ioc(_IOC_READ, 5, _INT.size)
WDIOC_SETTIMEOUT = _ioc(_IOC_READ | _IOC_WRITE, 6, _INT.size)
WDIOC_GETTIMEOUT = _ioc(_IOC_READ, 7, _INT.size)
WDIOC_GETTIMELEFT = _ioc(_IOC_READ, 10, _INT.size)

WDIOF_CARDRESET = 0x0020  # the last reboot was caused by the watchdog
WDIOF_SETTIMEOUT = 0x0080
WDIOF_MAGICCLOSE = 0x0100
WDIOF_KEEPALIVEPING = 0x8000

MAX_TIMEOUT_S = 65535


@dataclass(frozen=True, slots=True)
class WatchdogInfo:
    identity: str
    options: int
    firmware_version: int

    def supports(self, flag: int) -> bool:
        return bool(self.options & flag)


class Watchdog(Protocol):
    """What the agent needs from a watchdog. `start` arms it (returns the timeout
    the device actually applied), `keepalive` feeds it, `stop` disarms it with a
    magic close, `hand_over(timeout_s)` sets the timeout (where the device can),
    feeds it once and lets go of it still running (the next `start`, in this or
    another process, must come within that timeout),
    `last_reset_was_watchdog` tells whether the previous boot ended in a
    watchdog reset rather than a power cut or a clean reboot."""

    def start(self, timeout_s: int) -> int: ...

    def keepalive(self) -> None: ...

    def stop(self) -> None: ...

    def hand_over(self, timeout_s: int) -> None: ...

    def last_reset_was_watchdog(self) -> bool: ...


def _check_timeout(timeout_s: int) -> None:
    if not 1 <= timeout_s <= MAX_TIMEOUT_S:
        raise WatchdogError(f"watchdog timeout must be 1..{MAX_TIMEOUT_S} s, got {timeout_s}")


# -- /dev/watchdog ---------------------------------------------------------------


class DevWatchdog:
    """The kernel watchdog device. Only one process may hold it open: when systemd
    owns it (RuntimeWatchdogSec=), opening fails with EBUSY."""

    def __init__(self, path: Path = Path("/dev/watchdog"), *, sysfs: Path = Path("/sys/class/watchdog")) -> None:
        self.path = path
        self.sysfs = sysfs
        self._fd: int | None = None
        self._info: WatchdogInfo | None = None

    @property
    def armed(self) -> bool:
        return self._fd is not None

    def start(self, timeout_s: int) -> int:
        _check_timeout(timeout_s)
        if self._fd is not None:
            raise WatchdogError(f"watchdog {self.path}: already started")
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            hint = " (held by another process: systemd with RuntimeWatchdogSec=, or a watchdog daemon)" \
                if e.errno == errno.EBUSY else ""
            raise WatchdogError(f"watchdog {self.path}: cannot open: {e.strerror}{hint}") from e
        try:
            info = self.info()
            if info.supports(WDIOF_SETTIMEOUT):
                applied = self._ioctl_int(WDIOC_SETTIMEOUT, timeout_s, "WDIOC_SETTIMEOUT")
            else:
                applied = self._ioctl_int(WDIOC_GETTIMEOUT, 0, "WDIOC_GETTIMEOUT")
            self.keepalive()
        except WatchdogError:
            self._magic_close()
            raise
        return applied

    def info(self) -> WatchdogInfo:
        """WDIOC_GETSUPPORT: identity and supported options (needs the device open)."""
        if self._info is None:
            buf = bytearray(WATCHDOG_INFO.size)
            self._ioctl(WDIOC_GETSUPPORT, buf, "WDIOC_GETSUPPORT")
            options, firmware, identity = WATCHDOG_INFO.unpack(buf)
            name = identity.split(b"\0", 1)[0].decode("ascii", "replace")
            self._info = WatchdogInfo(name, options, firmware)
        return self._info

    def keepalive(self) -> None:
        fd = self._require_fd()
        if self.info().supports(WDIOF_KEEPALIVEPING):
            self._ioctl_int(WDIOC_KEEPALIVE, 0, "WDIOC_KEEPALIVE")
            return
        try:
            os.write(fd, b"\0")  # any write feeds it (and cancels an earlier 'V')
        except OSError as e:
            raise WatchdogError(f"watchdog {self.path}: keepalive write failed: {e.strerror}") from e

    def time_left(self) -> int:
        return self._ioctl_int(WDIOC_GETTIMELEFT, 0, "WDIOC_GETTIMELEFT")

    def stop(self) -> None:
        """Magic close: write 'V', then close. Without WDIOF_MAGICCLOSE the driver
        stops on any close; with nowayout it cannot be stopped at all."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, b"V")
        except OSError as e:
            self._close()
            raise WatchdogError(f"watchdog {self.path}: magic close write failed: {e.strerror}") from e
        self._close()

    def hand_over(self, timeout_s: int) -> None:
        """Set the timeout to `timeout_s` (when the driver can), feed once, then
        close without the magic character: the watchdog keeps running and resets
        the board unless the next opener feeds it within that time. (A driver
        without WDIOF_MAGICCLOSE stops on any close: it cannot be handed over,
        and the next opener arms it again.)"""
        _check_timeout(timeout_s)
        if self._fd is None:
            return
        try:
            if self.info().supports(WDIOF_SETTIMEOUT):
                self._ioctl_int(WDIOC_SETTIMEOUT, timeout_s, "WDIOC_SETTIMEOUT")
            self.keepalive()
        finally:
            self._close()

    def last_reset_was_watchdog(self) -> bool:
        """WDIOC_GETBOOTSTATUS & WDIOF_CARDRESET when the device is open; before
        `start` (opening would arm it) the same flag from sysfs ``bootstatus``."""
        if self._fd is not None:
            return bool(self._ioctl_int(WDIOC_GETBOOTSTATUS, 0, "WDIOC_GETBOOTSTATUS") & WDIOF_CARDRESET)
        name = self.path.resolve().name
        node = self.sysfs / ("watchdog0" if name == "watchdog" else name) / "bootstatus"
        try:
            text = node.read_text()
            return bool(int(text.strip(), 0) & WDIOF_CARDRESET)
        except (OSError, ValueError) as e:
            raise WatchdogError(
                f"watchdog {self.path}: boot status unknown before start() ({node}: {e}); start() arms the "
                "device and reads it with WDIOC_GETBOOTSTATUS"
            ) from e

    # -- ioctl plumbing ----------------------------------------------------------

    def _require_fd(self) -> int:
        if self._fd is None:
            raise WatchdogError(f"watchdog {self.path}: not started")
        return self._fd

    def _ioctl(self, request: int, buf: bytearray, what: str) -> None:
        fd = self._require_fd()
        try:
            fcntl.ioctl(fd, request, buf, True)
        except OSError as e:
            if e.errno == errno.ENOTTY:
                raise WatchdogError(f"watchdog {self.path}: not a watchdog device ({what} answered ENOTTY)") from e
            raise WatchdogError(f"watchdog {self.path}: {what} failed: {e.strerror}") from e

    def _ioctl_int(self, request: int, value: int, what: str) -> int:
        buf = bytearray(_INT.pack(value))
        self._ioctl(request, buf, what)
        result: int = _INT.unpack(buf)[0]
        return result

    def _magic_close(self) -> None:
        """Disarm on an error path; the caller is already raising the first error."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, b"V")
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as e:
                raise WatchdogError(f"watchdog {self.path}: close failed: {e.strerror}") from e


# -- the simulated twin ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimWatchdogRecord:
    armed: bool = False
    timeout_s: int = 0
    armed_at: float = 0.0
    last_keepalive: float = 0.0
    boot_status: int = 0  # WDIOF_CARDRESET when the previous boot ended in a watchdog reset
    reset_pending: bool = False  # fired since the last power-on


class SimWatchdog:
    """A watchdog whose hardware is a JSON file in `directory`, shared between the
    simulated device's agent (start/keepalive/stop) and the simulator, which asks
    `expired(now)` and, at power-on, calls `power_on(now)` (or `record_reset()`
    when it fired the watchdog itself) to set the boot status the next boot reads."""

    FILE = "watchdog.json"

    def __init__(self, directory: Path, *, clock: Clock = time.time) -> None:
        self.path = directory / self.FILE
        self.clock = clock

    def start(self, timeout_s: int) -> int:
        _check_timeout(timeout_s)
        now = self.clock()
        rec = self.record()
        self._write(SimWatchdogRecord(True, timeout_s, now, now, rec.boot_status))
        return timeout_s

    def keepalive(self) -> None:
        rec = self.record()
        if not rec.armed:
            raise WatchdogError(f"sim watchdog {self.path}: not started")
        self._write(SimWatchdogRecord(True, rec.timeout_s, rec.armed_at, self.clock(), rec.boot_status))

    def stop(self) -> None:
        rec = self.record()
        self._write(SimWatchdogRecord(boot_status=rec.boot_status))

    def hand_over(self, timeout_s: int) -> None:
        """Fed once with the new timeout and left armed: the next `start` takes it over."""
        _check_timeout(timeout_s)
        rec = self.record()
        if rec.armed:
            self._write(SimWatchdogRecord(True, timeout_s, rec.armed_at, self.clock(), rec.boot_status))

    def last_reset_was_watchdog(self) -> bool:
        return bool(self.record().boot_status & WDIOF_CARDRESET)

    # -- the simulator's side ----------------------------------------------------

    def deadline(self) -> float | None:
        """When the watchdog fires if not fed again (None: disarmed)."""
        rec = self.record()
        return rec.last_keepalive + rec.timeout_s if rec.armed else None

    def expired(self, now: float | None = None) -> bool:
        """Armed, not magic-closed, and not fed for longer than its timeout."""
        deadline = self.deadline()
        return deadline is not None and (self.clock() if now is None else now) > deadline

    def record_reset(self) -> None:
        """The simulator fired the watchdog (it saw `expired`): the board resets,
        the watchdog is disarmed, and the next `power_on` reports a watchdog reset."""
        self._write(SimWatchdogRecord(boot_status=self.record().boot_status, reset_pending=True))

    def power_on(self, now: float | None = None) -> bool:
        """The board comes up. `now` is when the previous boot ended (default: the
        clock): a power cut at t is judged at t, a hang by how long the board ran
        on. It was a watchdog reset if one was recorded, or if the watchdog was
        armed and had expired by then; otherwise a power cut or a clean reboot.
        Sets the boot status this boot reads (`last_reset_was_watchdog`), leaves
        the watchdog disarmed, and returns it."""
        fired = self.record().reset_pending or self.expired(now)
        self._write(SimWatchdogRecord(boot_status=WDIOF_CARDRESET if fired else 0))
        return fired

    def record(self) -> SimWatchdogRecord:
        try:
            raw = read_regular(self.path, 64 * 1024)  # never a FIFO or a link
        except FileNotFoundError:
            return SimWatchdogRecord()
        except OSError as e:
            raise WatchdogError(f"sim watchdog {self.path}: cannot read: {e.strerror}") from e
        try:
            doc = json.loads(raw)
            return SimWatchdogRecord(
                armed=bool(doc["armed"]),
                timeout_s=int(doc["timeout_s"]),
                armed_at=float(doc["armed_at"]),
                last_keepalive=float(doc["last_keepalive"]),
                boot_status=int(doc["boot_status"]),
                reset_pending=bool(doc.get("reset_pending", False)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise WatchdogError(f"sim watchdog {self.path}: invalid record: {e}") from e

    def _write(self, rec: SimWatchdogRecord) -> None:
        try:
            atomic_write(self.path, json.dumps(asdict(rec), sort_keys=True).encode() + b"\n")
        except OSError as e:
            raise WatchdogError(f"sim watchdog {self.path}: cannot write: {e.strerror}") from e


class NoWatchdog:
    """For devices without a hardware watchdog: every call succeeds and does nothing."""

    def start(self, timeout_s: int) -> int:
        _check_timeout(timeout_s)
        return timeout_s

    def keepalive(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def hand_over(self, timeout_s: int) -> None:
        _check_timeout(timeout_s)

    def last_reset_was_watchdog(self) -> bool:
        return False


WATCHDOG_BACKENDS = ("dev", "sim", "none")


def open_watchdog(backend: str, path: Path, *, clock: Clock = time.time) -> Watchdog:
    """``dev``: the device node at `path`; ``sim``: the simulated twin in directory
    `path`; ``none``: no watchdog."""
    if backend == "dev":
        return DevWatchdog(path)
    if backend == "sim":
        return SimWatchdog(path, clock=clock)
    if backend == "none":
        return NoWatchdog()
    raise WatchdogError(f"unknown watchdog backend {backend!r}; choose one of {', '.join(WATCHDOG_BACKENDS)}")
