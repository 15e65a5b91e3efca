"""A kernel command line without a usable slot marker (no `ota.slot=`, or one
naming a slot the bootloader does not know): `status` still answers, exit 0,
with booted unknown and a problem saying how to fix it (text and --json), and
everything else it knows. Commands that change state refuse with one line."""

from __future__ import annotations

import json

import pytest

from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory

CMDLINES = {
    "empty": ("", "no ota.slot= or rauc.slot= on the kernel command line"),
    "no marker": ("console=ttyS0 root=/dev/mmcblk0p2 quiet\n", "no ota.slot= or rauc.slot= on the kernel command line"),
    "unknown slot": ("ota.slot=C\n", "booted slot 'C' is not one of A, B"),
}


@pytest.mark.parametrize("case", sorted(CMDLINES))
def test_status_without_a_slot_marker_says_booted_is_unknown_and_how_to_fix_it(
    device: SimDevice, make_bundle: BundleFactory, case: str
) -> None:
    device.install_ok(make_bundle("2.0"))
    cmdline, why = CMDLINES[case]
    (device.dir / "cmdline").write_text(cmdline)

    run = device.agent("status", "--json")
    assert run.rc == 0, run.err
    doc = json.loads(run.out)
    assert doc["booted"] is None
    [problem] = doc["problems"]
    assert problem.startswith("booted slot unknown:")
    assert why in problem
    assert "ota.slot=<bootname> (one of A, B) on the kernel command line" in problem
    # Everything else is still there.
    assert doc["primary"] == "B"
    assert doc["slots"]["B"]["version"] == "2.0"
    assert doc["trial"]["slot"] == "B"
    assert doc["last_result"]["event"] == "install"

    text = device.agent("status")
    assert text.rc == 0, text.err
    lines = text.out.splitlines()
    assert "booted      unknown (see problem below)" in lines
    assert any(line.startswith("problem     booted slot unknown:") and "ota.slot=" in line for line in lines)
    assert any(line.startswith("slot B") and "2.0" in line for line in lines)


def test_status_with_a_slot_marker_reports_no_problems(device: SimDevice) -> None:
    doc = device.status()
    assert (doc["booted"], doc["problems"]) == ("A", [])
    assert not any(line.startswith("problem") for line in device.agent("status").out.splitlines())


@pytest.mark.parametrize("argv", [("mark-good", "other"), ("mark-bad", "booted"), ("boot-check",)])
def test_state_changing_commands_without_a_slot_marker_refuse_with_one_line(
    device: SimDevice, argv: tuple[str, ...]
) -> None:
    (device.dir / "cmdline").write_text("quiet\n")
    before = device.snapshot()
    line = device.agent(*argv).one_error_line()
    assert "no ota.slot= or rauc.slot= on the kernel command line" in line
    after = device.snapshot()
    assert after.bootloader == before.bootloader
    assert after.agent_state() == before.agent_state()
    assert device.outbox() == []
