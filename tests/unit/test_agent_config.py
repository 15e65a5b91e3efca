"""Config loading: strict keys, types and ranges, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError

BASE = """
[device]
compatible = "acme"
state_dir = "state"
keyring = "keys"

[bootloader]
backend = "sim"
path = "boot.json"
{boot_extra}

[[slots]]
bootname = "A"
path = "a.img"

[[slots]]
bootname = "B"
path = "b.img"
{extra}
"""


def write(tmp_path: Path, extra: str = "", boot_extra: str = "") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(BASE.format(extra=extra, boot_extra=boot_extra))
    return p


def test_loads_defaults_and_resolves_relative_paths_against_the_config_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path))
    assert cfg.compatible == "acme"
    assert cfg.tries == 3
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.slots[0].path == tmp_path / "a.img"
    assert cfg.slots[0].slot_class == "rootfs"
    assert cfg.bootnames == ("A", "B")
    assert cfg.reboot_command == ("systemctl", "reboot")


@pytest.mark.parametrize(
    ("extra", "boot_extra", "message"),
    [
        ("[health]\nfrobnicate = 1", "", r"\[health\].*unknown key 'frobnicate'"),
        ("", "tries = 0", r"\[bootloader\] tries.*outside 1..15"),
        ("", 'tries = "3"', r"\[bootloader\] tries.*must be an integer"),
        ("[health]\ncommands = ['true']", "", r"\[health\] commands.*list of commands"),
        ("[health]\ndeadline = -1", "", r"\[health\] deadline.*outside"),
        ("", 'reboot_command = "reboot"', r"reboot_command.*list of strings"),
    ],
)
def test_rejects_bad_values_naming_file_table_and_key(
    tmp_path: Path, extra: str, boot_extra: str, message: str
) -> None:
    path = write(tmp_path, extra, boot_extra)
    with pytest.raises(ConfigError, match=message) as exc:
        config.load(path)
    assert str(path) in str(exc.value)


def test_rejects_unknown_bootloader_backend(tmp_path: Path) -> None:
    p = write(tmp_path)
    p.write_text(p.read_text().replace('backend = "sim"', 'backend = "lilo"'))
    with pytest.raises(ConfigError, match="unknown backend 'lilo'"):
        config.load(p)


def test_rejects_a_single_slot_and_duplicate_bootnames(tmp_path: Path) -> None:
    p = write(tmp_path)
    text = p.read_text()
    p.write_text(text.replace('bootname = "B"', 'bootname = "A"'))
    with pytest.raises(ConfigError, match="two slots of class 'rootfs' with bootname 'A'"):
        config.load(p)


def test_rejects_invalid_toml_with_its_location(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text("[device\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(p)
