"""`DevWatchdog`, the /dev/watchdog driver, against real files and devices:
the kernel header (compiled with gcc) for the ioctl numbers, an ordinary file
and /dev/null for the "not a watchdog" path (the kernel answers ENOTTY), a
sysfs-shaped directory for the boot status read before arming, and the
software watchdog `softdog` when this kernel has one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import hw.watchdog as wd
from hw.errors import WatchdogError
from hw.watchdog import DevWatchdog, NoWatchdog, SimWatchdog, open_watchdog

HEADER = Path("/usr/include/linux/watchdog.h")

PROGRAM = r"""
#include <stdio.h>
#include <linux/watchdog.h>
int main(void) {
    printf("%lu %lu %lu %lu %lu %lu %zu %d\n",
        (unsigned long)WDIOC_GETSUPPORT, (unsigned long)WDIOC_GETBOOTSTATUS, (unsigned long)WDIOC_KEEPALIVE,
        (unsigned long)WDIOC_SETTIMEOUT, (unsigned long)WDIOC_GETTIMEOUT, (unsigned long)WDIOC_GETTIMELEFT,
        sizeof(struct watchdog_info), WDIOF_CARDRESET);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None or not HEADER.exists(), reason="gcc or <linux/watchdog.h> absent")
def test_ioctl_numbers_equal_the_compiled_kernel_header(tmp_path: Path) -> None:
    src = tmp_path / "w.c"
    src.write_text(PROGRAM)
    subprocess.run(["gcc", "-o", str(tmp_path / "w"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "w")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in out] == [
        wd.WDIOC_GETSUPPORT, wd.WDIOC_GETBOOTSTATUS, wd.WDIOC_KEEPALIVE, wd.WDIOC_SETTIMEOUT,
        wd.WDIOC_GETTIMEOUT, wd.WDIOC_GETTIMELEFT, wd.WATCHDOG_INFO.size, wd.WDIOF_CARDRESET,
    ]


def test_an_ordinary_file_is_not_a_watchdog_and_is_magic_closed(tmp_path: Path) -> None:
    fake = tmp_path / "watchdog"
    fake.write_bytes(b"")
    dog = DevWatchdog(fake)
    with pytest.raises(WatchdogError, match=r"not a watchdog device \(WDIOC_GETSUPPORT answered ENOTTY\)") as info:
        dog.start(30)
    assert str(fake) in str(info.value)
    # The error path disarms what it opened: 'V' written, descriptor closed.
    assert fake.read_bytes() == b"V"
    assert not dog.armed


def test_dev_null_answers_enotty_too() -> None:
    with pytest.raises(WatchdogError, match="not a watchdog device"):
        DevWatchdog(Path("/dev/null")).start(10)


def test_missing_device_names_the_path_and_the_reason(tmp_path: Path) -> None:
    with pytest.raises(WatchdogError, match=r"cannot open: No such file or directory"):
        DevWatchdog(tmp_path / "nope").start(10)


@pytest.mark.parametrize("timeout", [0, -1, 70000])
def test_timeouts_out_of_range_are_refused_before_opening(tmp_path: Path, timeout: int) -> None:
    fake = tmp_path / "watchdog"
    fake.write_bytes(b"")
    with pytest.raises(WatchdogError, match="timeout must be"):
        DevWatchdog(fake).start(timeout)
    assert fake.read_bytes() == b""


def test_keepalive_before_start_is_an_error_and_stop_is_a_no_op(tmp_path: Path) -> None:
    dog = DevWatchdog(tmp_path / "watchdog")
    with pytest.raises(WatchdogError, match="not started"):
        dog.keepalive()
    dog.stop()


@pytest.mark.parametrize(("status", "expected"), [("32\n", True), ("0x20\n", True), ("0\n", False), ("16\n", False)])
def test_boot_status_before_arming_comes_from_sysfs(tmp_path: Path, status: str, expected: bool) -> None:
    node = tmp_path / "class" / "watchdog0"
    node.mkdir(parents=True)
    (node / "bootstatus").write_text(status)
    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    assert DevWatchdog(dev, sysfs=tmp_path / "class").last_reset_was_watchdog() is expected
    assert dev.read_bytes() == b""  # never opened, so never armed


def test_boot_status_without_sysfs_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(WatchdogError, match="boot status unknown before start"):
        DevWatchdog(tmp_path / "watchdog", sysfs=tmp_path / "none").last_reset_was_watchdog()


def test_registry_builds_each_backend(tmp_path: Path) -> None:
    assert isinstance(open_watchdog("dev", tmp_path / "w"), DevWatchdog)
    assert isinstance(open_watchdog("sim", tmp_path), SimWatchdog)
    none = open_watchdog("none", tmp_path)
    assert isinstance(none, NoWatchdog)
    assert none.start(10) == 10
    assert none.last_reset_was_watchdog() is False
    with pytest.raises(WatchdogError, match="unknown watchdog backend 'x'"):
        open_watchdog("x", tmp_path)


def _softdog() -> Path | None:
    """/dev/watchdog when sysfs says it is the kernel's software watchdog and can
    be stopped (nowayout 0). Real hardware is never opened: opening arms it."""
    sysfs = Path("/sys/class/watchdog/watchdog0")
    try:
        identity = (sysfs / "identity").read_text().strip()
        nowayout = (sysfs / "nowayout").read_text().strip()
    except OSError:
        return None
    path = Path("/dev/watchdog")
    return path if identity == "Software Watchdog" and nowayout == "0" and path.exists() else None


SOFTDOG = _softdog()


@pytest.mark.skipif(SOFTDOG is None, reason="no free softdog at /dev/watchdog (modprobe softdog; no module here)")
def test_softdog_arms_feeds_and_magic_closes() -> None:
    assert SOFTDOG is not None
    dog = DevWatchdog(SOFTDOG)
    try:
        assert dog.start(45) == 45
        assert dog.info().supports(wd.WDIOF_MAGICCLOSE)
        dog.keepalive()
        assert 0 < dog.time_left() <= 45
        assert dog.last_reset_was_watchdog() in (True, False)
    finally:
        dog.stop()
    assert not dog.armed
    os.sync()
