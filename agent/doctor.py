"""`ota-agent doctor`: what a bring-up needs, one line per check with the fix.

Owns the list of checks and their verdicts; reads, never writes. Each check is
a function of the `Device` (its config and backends) and a `Host` (the system
facts a check looks at: the mount table, the root, where systemd units live),
so a simulated device and the tests run the very same checks on their own
files. A check is OK, FAIL (with the fix) or SKIP (does not apply here, with
why); the report is ok when nothing failed.

Checks: slot marker on the kernel command line; bootloader state readable;
its storage writable; per slot: exists, large enough (all slots of a class the
same size, and each at least the bundle's image when one is given), not
mounted and not the running root (the booted slot excepted); keyring loads;
systemd units installed; watchdog present.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.daemon import Device
from agent.sources import source_for
from bundler.format.reader import BundleReader
from bundler.format.signing import Keyring, VerifiedBundle, verify
from hw import slotid
from hw.bootloader.chooser import booted_from_cmdline
from hw.bootloader.init import describe, storage_paths
from hw.slot import slot_size
from ota_common.errors import OtaError
from ota_common.text import clean

UNITS = ("ota-agent.service", "ota-boot-check.service", "ota-trial-watchdog.service")
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
DETAIL_LIMIT = 300


class Status(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail", clean(self.detail, DETAIL_LIMIT))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail, "fix": self.fix or None}

    def line(self) -> str:
        text = f"{self.status.value.upper():4}  {self.name}: {self.detail}"
        return f"{text} -- fix: {self.fix}" if self.fix and self.status is Status.FAIL else text


@dataclass(frozen=True, slots=True)
class DoctorReport:
    checks: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return all(c.status is not Status.FAIL for c in self.checks)

    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status is Status.FAIL]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}

    def render(self) -> str:
        failed = len(self.failed())
        summary = "doctor: all checks passed" if not failed else f"doctor: {failed} check(s) failed"
        return "\n".join([*(c.line() for c in self.checks), summary])


@dataclass(frozen=True, slots=True)
class Host:
    """The system facts the checks read; the real system by default."""

    mountinfo: Path = slotid.MOUNTINFO
    root: Path = Path("/")
    unit_dirs: tuple[Path, ...] = UNIT_DIRS
    simulated: bool = False  # a simulated device: no systemd units expected

    @classmethod
    def for_device(cls, device: Device) -> Host:
        return cls(simulated=device.config.watchdog.backend == "sim")


@dataclass(frozen=True, slots=True)
class Context:
    device: Device
    host: Host
    bundle: VerifiedBundle | None = None
    factory: bool = False  # running from a factory environment: no slot is booted, none may be mounted
    booted: list[str] = field(default_factory=list)


Check = Callable[[Context], Iterator[CheckResult]]


def check_slot_marker(ctx: Context) -> Iterator[CheckResult]:
    name = "slot marker"
    cmdline = ctx.device.config.cmdline
    try:
        booted = booted_from_cmdline(cmdline)
    except OtaError as e:
        if ctx.factory:
            yield CheckResult(name, Status.OK, f"no slot booted ({cmdline}): a factory environment")
            return
        yield CheckResult(name, Status.FAIL, str(e), "boot through the shipped boot script (boot.scr, grub.cfg, "
                          "or a BLS entry whose options carry ota.slot=<bootname>)")
        return
    if booted not in ctx.device.config.bootnames:
        known = ", ".join(ctx.device.config.bootnames)
        yield CheckResult(name, Status.FAIL, f"{cmdline} names slot {booted!r}, not one of {known}",
                          "make the bootloader's slot names match the [[slots]] bootnames")
        return
    if ctx.factory:
        yield CheckResult(name, Status.FAIL, f"slot {booted} is booted ({cmdline})",
                          "provision from a factory environment (initramfs, USB or network boot), not from a slot")
        return
    ctx.booted.append(booted)
    yield CheckResult(name, Status.OK, f"slot {booted} booted ({cmdline})")


def check_env_readable(ctx: Context) -> Iterator[CheckResult]:
    bl = ctx.device.bootloader
    try:
        state = bl.state()
    except OtaError as e:
        yield CheckResult("bootloader state", Status.FAIL, str(e), "ota-agent bootloader init (docs/bootloaders.md)")
        return
    yield CheckResult("bootloader state", Status.OK, f"{bl.name}: {describe(state)}")


def check_env_writable(ctx: Context) -> Iterator[CheckResult]:
    try:
        paths = storage_paths(ctx.device.bootloader.env)
    except OtaError as e:
        yield CheckResult("bootloader storage", Status.FAIL, str(e), "fix the [bootloader] path (docs/bootloaders.md)")
        return
    problems = []
    for p in paths:
        target = p if p.exists() else p.parent
        if not target.exists():
            problems.append(f"{p}: neither it nor its directory exists")
        elif not os.access(target, os.W_OK):
            problems.append(f"{target} is not writable")
        elif p.is_file() and not os.access(p.parent, os.W_OK):
            problems.append(f"{p.parent} is not writable (files there are replaced atomically)")
    if problems:
        yield CheckResult("bootloader storage", Status.FAIL, "; ".join(problems),
                          "mount /boot (or the ESP) read-write and allow it in the unit (ReadWritePaths=)")
    else:
        yield CheckResult("bootloader storage", Status.OK, "writable: " + ", ".join(str(p) for p in paths))


def check_slots(ctx: Context) -> Iterator[CheckResult]:
    cfg = ctx.device.config
    sizes: dict[str, dict[str, int]] = {}
    wanted = {im.slot_class: im.size for im in ctx.bundle.manifest.images} if ctx.bundle else {}
    for s in cfg.slots:
        name = f"slot {s.bootname} {s.slot_class}"
        try:
            size = slot_size(s.path, s.bootname)
        except OtaError as e:
            yield CheckResult(name, Status.FAIL, str(e), "create the partition (or file) the config names")
            continue
        sizes.setdefault(s.slot_class, {})[s.bootname] = size
        need = wanted.get(s.slot_class)
        if need is not None and size < need:
            yield CheckResult(name, Status.FAIL, f"{s.path} holds {size} bytes, the image needs {need}",
                              "repartition: every slot of a class must hold the largest image")
            continue
        if s.bootname in ctx.booted:
            yield CheckResult(name, Status.OK, f"{s.path}, {size} bytes (booted)")
            continue
        try:
            ident = slotid.identity(s.path)
            where = slotid.mounted_at(ident, ctx.host.mountinfo)
            root = slotid.backs_root(ident, ctx.host.root)
        except OSError as e:
            yield CheckResult(name, Status.FAIL, f"{s.path}: {e.strerror}", "check the slot's path")
            continue
        if where is not None or root:
            what = f"mounted at {where}" if where else "the running root filesystem"
            yield CheckResult(name, Status.FAIL, f"{s.path} is {what}",
                              "unmount it (a slot that is not booted is never mounted)")
            continue
        yield CheckResult(name, Status.OK, f"{s.path}, {size} bytes, not mounted")
    for cls, by_boot in sizes.items():
        if len(set(by_boot.values())) > 1:
            listed = ", ".join(f"{b} {n}" for b, n in sorted(by_boot.items()))
            yield CheckResult(f"slot sizes {cls}", Status.FAIL, f"slots differ: {listed}",
                              "make every slot of a class the same size, or an update may not fit its slot")


def check_keyring(ctx: Context) -> Iterator[CheckResult]:
    path = ctx.device.config.keyring
    try:
        ring = Keyring.load(path)
    except OtaError as e:
        yield CheckResult("keyring", Status.FAIL, str(e), "install the release signing key(s) as PEM .pub files")
        return
    yield CheckResult("keyring", Status.OK, f"{path}: {len(ring.keys)} trusted key(s)")


def check_units(ctx: Context) -> Iterator[CheckResult]:
    if ctx.host.simulated:
        yield CheckResult("systemd units", Status.SKIP, "a simulated device (watchdog backend sim) has no units")
        return
    missing = [u for u in UNITS if not any((d / u).is_file() for d in ctx.host.unit_dirs)]
    if missing:
        yield CheckResult("systemd units", Status.FAIL, f"not installed: {', '.join(missing)}",
                          "install systemd/*.service and systemctl enable " + " ".join(UNITS))
    else:
        yield CheckResult("systemd units", Status.OK, "installed: " + ", ".join(UNITS))


def check_watchdog(ctx: Context) -> Iterator[CheckResult]:
    wd = ctx.device.config.watchdog
    if wd.backend == "none":
        yield CheckResult("watchdog", Status.SKIP, "backend none: systemd's RuntimeWatchdogSec= owns /dev/watchdog")
        return
    try:
        mode = os.stat(wd.path).st_mode
    except OSError as e:
        yield CheckResult("watchdog", Status.FAIL, f"{wd.path}: {e.strerror}",
                          "load the board's watchdog driver, or set [watchdog] backend = \"none\"")
        return
    if wd.backend == "dev" and not stat.S_ISCHR(mode):
        yield CheckResult("watchdog", Status.FAIL, f"{wd.path} is not a character device", "point [watchdog] path "
                          "at /dev/watchdog or /dev/watchdogN")
    elif wd.backend == "sim" and not stat.S_ISDIR(mode):
        yield CheckResult("watchdog", Status.FAIL, f"{wd.path} is not a directory", "point [watchdog] path at "
                          "the simulated device's directory")
    else:
        yield CheckResult("watchdog", Status.OK, f"{wd.backend}: {wd.path}")


CHECKS: tuple[Check, ...] = (
    check_slot_marker, check_env_readable, check_env_writable, check_slots, check_keyring, check_units,
    check_watchdog,
)


def bundle_head(device: Device, path: str) -> VerifiedBundle:
    """The verified head (manifest) of a bundle file: what its images need of the slots."""
    with source_for(path, device.config.download).open() as stream:
        return verify(BundleReader(stream).read_head(), device.keyring())


def doctor(
    device: Device,
    host: Host | None = None,
    *,
    bundle: VerifiedBundle | None = None,
    factory: bool = False,
    checks: tuple[Check, ...] = CHECKS,
) -> DoctorReport:
    ctx = Context(device, host or Host.for_device(device), bundle, factory)
    return DoctorReport(tuple(r for check in checks for r in check(ctx)))
