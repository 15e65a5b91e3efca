"""Through the CLI, a hostile agent.toml stops every command with exit status 1
and one error line naming the file (and key where known), never a traceback,
and the device is left as it was."""

from __future__ import annotations

import pytest

from tests.e2e._sim import SimDevice

CASES = {
    "deeply nested": ("a = " + "[" * 3000 + "]" * 3000 + "\n", ["nested too deeply"]),
    "4300-digit integer": ("[x]\nn = " + "9" * 5000 + "\n", ["4300 digits"]),
    "NUL in a path": (None, ["[device] state_dir", "NUL"]),
    "huge hex integer": (None, ["[bootloader] tries", "an integer of 20000 bits"]),
    "long dotted key": ("a" + ".a" * 50000 + " = 1\n", ["32 parts"]),
}


def hostile(case: str, text: str) -> str:
    if case == "NUL in a path":
        return text.replace('state_dir = "state"', 'state_dir = "st\\u0000ate"')
    if case == "huge hex integer":
        return text.replace("tries = 3", "tries = 0x" + "f" * 5000)
    return CASES[case][0] or ""


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", [["status"], ["boot-check", "--no-reboot"]], ids=lambda c: c[0])
def test_hostile_config_is_exit_1_and_one_line(device: SimDevice, case: str, command: list[str]) -> None:
    text = device.config.read_text()
    device.config.write_text(hostile(case, text))
    before = device.snapshot()
    r = device.agent(*command)
    assert r.rc == 1
    line = r.one_error_line()
    assert str(device.config) in line
    for fragment in CASES[case][1]:
        assert fragment in line, line
    assert device.snapshot() == before


def test_non_utf8_config_is_exit_1_and_one_line(device: SimDevice) -> None:
    device.config.write_bytes(device.config.read_bytes() + b"\n# caf\xe9\n")
    r = device.agent("status")
    assert r.rc == 1
    assert "not UTF-8" in r.one_error_line()
