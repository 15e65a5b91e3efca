"""The watchdog ioctl request numbers, computed like <asm-generic/ioctl.h> does,
equal the ones compiled from this machine's <linux/watchdog.h> (the table in
research/tooling.md; tests/component/test_watchdog.py recompiles them with gcc)."""

from __future__ import annotations

import hw.watchdog as wd
from hw.watchdog import _ioc_layout


def test_request_numbers_match_linux_watchdog_h_on_asm_generic_architectures() -> None:
    assert _ioc_layout("x86_64") == _ioc_layout("aarch64") == _ioc_layout("armv7l") == (14, 2, 1)
    assert wd.WATCHDOG_INFO.size == 40
    assert wd.WDIOC_GETSUPPORT == 0x80285700
    assert wd.WDIOC_GETSTATUS == 0x80045701
    assert wd.WDIOC_GETBOOTSTATUS == 0x80045702
    assert wd.WDIOC_SETOPTIONS == 0x80045704
    assert wd.WDIOC_KEEPALIVE == 0x80045705
    assert wd.WDIOC_SETTIMEOUT == 0xC0045706
    assert wd.WDIOC_GETTIMEOUT == 0x80045707
    assert wd.WDIOC_GETTIMELEFT == 0x8004570A


def test_architectures_with_their_own_ioctl_layout_are_recognised() -> None:
    # mips, powerpc, sparc and alpha: 13 size bits, _IOC_READ=2, _IOC_WRITE=4.
    for machine in ("mips", "mipsel", "ppc64le", "powerpc", "sparc64", "alpha"):
        assert _ioc_layout(machine) == (13, 2, 4)


def test_flag_values_are_the_kernel_ones() -> None:
    assert (wd.WDIOF_CARDRESET, wd.WDIOF_SETTIMEOUT, wd.WDIOF_MAGICCLOSE, wd.WDIOF_KEEPALIVEPING) == (
        0x20, 0x80, 0x100, 0x8000,
    )
