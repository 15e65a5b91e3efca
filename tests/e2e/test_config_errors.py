"""A broken agent config stops every command with one line that names the
file, the table and the key, and nothing on the device is touched."""

from __future__ import annotations

import re

import pytest

from tests.e2e._sim import SimDevice

SLOTS_RE = re.compile(r"\n\[\[slots\]\].*?(?=\n\[health\])", re.S)


def edit(text: str, case: str) -> str:
    match case:
        case "unknown key":
            return text.replace("[device]\n", '[device]\ncolour = "blue"\n')
        case "unknown table":
            return text + '\n[telemetry]\nendpoint = "localhost"\n'
        case "unknown slot key":
            return text.replace('bootname = "B"\n', 'bootname = "B"\nsize = 1\n')
        case "wrong type":
            return text.replace("tries = 3", 'tries = "3"')
        case "tries zero":
            return text.replace("tries = 3", "tries = 0")
        case "tries too many":
            return text.replace("tries = 3", "tries = 16")
        case "missing slots":
            return SLOTS_RE.sub("", text)
        case "one slot":
            return text.replace('\n[[slots]]\nbootname = "B"\nclass = "rootfs"\npath = "slot-B.img"\n', "")
        case "missing compatible":
            return re.sub(r"compatible = .*\n", "", text, count=1)
        case "not toml":
            return text + "\n[device\n"
    raise AssertionError(case)


CASES = [
    ("unknown key", ["device", "'colour'", "unknown key"]),
    ("unknown table", ["unknown key 'telemetry'"]),
    ("unknown slot key", ["slots.1", "'size'", "unknown key"]),
    ("wrong type", ["[bootloader] tries", "must be an integer", "'3'"]),
    ("tries zero", ["[bootloader] tries", "= 0 is outside 1..15"]),
    ("tries too many", ["[bootloader] tries", "= 16 is outside 1..15"]),
    ("missing slots", ["[[slots]]", "at least two [[slots]] tables are required"]),
    ("one slot", ["[[slots]]", "at least two bootnames"]),
    ("missing compatible", ["[device] compatible", "is required"]),
    ("not toml", ["not valid TOML"]),
]


@pytest.mark.parametrize(("case", "fragments"), CASES, ids=[c for c, _ in CASES])
@pytest.mark.parametrize("command", [["status"], ["install", "/nonexistent.otab"], ["boot-check", "--no-reboot"]])
def test_bad_config_is_one_line_naming_file_table_and_key(
    device: SimDevice, case: str, fragments: list[str], command: list[str]
) -> None:
    original = device.config.read_text()
    broken = edit(original, case)
    assert broken != original
    device.config.write_text(broken)
    before = device.snapshot()
    line = device.agent(*command).one_error_line()
    assert str(device.config) in line
    for fragment in fragments:
        assert fragment in line, line
    assert device.snapshot() == before


def test_sim_boot_with_a_bad_config_is_one_clear_error(device: SimDevice) -> None:
    device.config.write_text(edit(device.config.read_text(), "tries zero"))
    r = device.run("sim", "boot", str(device.dir))
    line = r.one_error_line()
    assert str(device.config) in line
    assert "[bootloader] tries" in line


def test_missing_config_file_is_one_clear_error(device: SimDevice) -> None:
    missing = device.dir / "nope.toml"
    line = device.run("-c", str(missing), "status").one_error_line()
    assert str(missing) in line
    assert "cannot read" in line
