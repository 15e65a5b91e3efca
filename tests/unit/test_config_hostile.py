"""A hostile agent.toml (anything the bytes of a file can be) gives exactly one
ConfigError naming the file, and the key where one is known: never a
RecursionError, ValueError, OverflowError or other traceback, and never a
parse that takes quadratic time. The regression cases are what fuzzing the
loader found; the property test keeps fuzzing it with generated TOML-ish text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config
from agent.errors import ConfigError

BASE = """[device]
compatible = "acme"
state_dir = "state"
keyring = "keys"
cmdline = "cmdline"

[bootloader]
backend = "sim"
path = "boot.json"
tries = 3
reboot_command = []

[[slots]]
bootname = "A"
class = "rootfs"
path = "a.img"

[[slots]]
bootname = "B"
class = "rootfs"
path = "b.img"

[health]
deadline = 30
commands = []
units = []

[watchdog]
backend = "sim"
path = "."
timeout = 30
"""


def load_text(tmp_path: Path, text: str | bytes) -> ConfigError:
    p = tmp_path / "agent.toml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ConfigError) as info:
        config.load(p)
    message = str(info.value)
    assert message.startswith(str(p)), message
    assert "\n" not in message
    return info.value


def set_key(key: str, value: str) -> str:
    lines = BASE.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
    lines[index] = f"{key} = {value}"
    return "\n".join(lines) + "\n"


def test_base_config_loads(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(BASE)
    assert config.load(p).tries == 3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("a = " + "{b = " * 5000 + "1" + "}" * 5000, "nested too deeply"),
        ("a" + ".a" * 60000 + " = 1", "dotted key or table name of more than 32 parts"),
        ("[" + ".".join(['"q"'] * 60000) + "]", "dotted key or table name of more than 32 parts"),
        (set_key("tries", "9" * 5000), "4300 digits"),
        (b"[device]\ncompatible = \"\xff\xfe\"\n", "not UTF-8: byte 23"),
        (b"\xef\xbb\xbf" + BASE.encode(), "not valid TOML"),  # a BOM is not TOML
        ("[device\n", "not valid TOML"),
    ],
    ids=["deep arrays", "deep inline tables", "long dotted key", "long table name", "4300-digit integer",
         "not UTF-8", "BOM", "bad TOML"],
)
def test_unparseable_config_is_one_line_naming_the_file(tmp_path: Path, text: str | bytes, fragment: str) -> None:
    assert fragment in str(load_text(tmp_path, text))


def test_long_dotted_key_is_refused_quickly_not_parsed_in_quadratic_time(tmp_path: Path) -> None:
    # 120,000 parts: tomllib alone would take minutes; the pre-check answers from one linear scan.
    assert "32 parts" in str(load_text(tmp_path, "a" + ".a" * 120_000 + " = 1"))


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("tries", "0x" + "f" * 5000, "[bootloader] tries: = an integer of 20000 bits is outside 1..15"),
        ("deadline", "0x" + "f" * 5000, "[health] deadline: = an integer of 20000 bits is outside"),
        ("compatible", "0x" + "f" * 5000, "[device] compatible: must be a non-empty string, got an integer"),
        ("tries", "[0x" + "f" * 5000 + "]", "[bootloader] tries: must be an integer, got a list"),
        ("state_dir", '"a\\u0000b"', "[device] state_dir: must not contain a NUL character"),
        ("path", '"/x/\\u0000"', "[bootloader] path: must not contain a NUL character"),
        ("deadline", "nan", "[health] deadline: = nan is outside"),
        ("deadline", "inf", "[health] deadline: = inf is outside"),
        ("tries", "1979-05-27T07:32:00+23:59", "[bootloader] tries: must be an integer, got datetime"),
    ],
)
def test_hostile_value_is_one_line_naming_the_key(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    assert fragment in str(load_text(tmp_path, set_key(key, value)))


def test_nul_in_a_slot_path_names_the_slot_table(tmp_path: Path) -> None:
    text = BASE.replace('path = "a.img"', 'path = "a\\u0000.img"')
    assert "[slots.0] path: must not contain a NUL character" in str(load_text(tmp_path, text))


def test_symlink_loop_in_a_path_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    text = set_key("state_dir", '"loop/state"')
    assert "[device] state_dir: cannot resolve" in str(load_text(tmp_path, text))


def test_too_many_slot_tables_are_refused_before_comparing_pairs(tmp_path: Path) -> None:
    many = "".join(f'\n[[slots]]\nbootname = "S{i}"\npath = "s{i}.img"\n' for i in range(5000))
    assert "5002 [[slots]] tables, at most 64" in str(load_text(tmp_path, BASE + many))


def test_config_path_with_a_nul_or_naming_a_fifo_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "a\0b.toml")
    fifo = tmp_path / "agent.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a FIFO, not a regular file"):
        config.load(fifo)  # refused before opening: no hang


# --- fuzzing --------------------------------------------------------------------------

_ATOMS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(4000, 6000).map(lambda n: "9" * n),
    st.integers(1000, 2000).map(lambda n: "0x" + "f" * n),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0.0", "true", "1979-05-27T07:32:00+23:59", "0001-01-01",
                     "23:59:59.999999", '"\\u0000"', '"a\\u0000b"', '""', '"."', '".."', '"/"', '"a.img"',
                     '"b.img"', '"x/../a.img"', '"/dev/null"', "'lit'", '"\\U0010FFFF"']),
    st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=12).map(
        lambda s: '"' + "".join(f"\\u{ord(c):04x}" for c in s) + '"'
    ),
)
_VALUES = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.sampled_from(["a", "path", "bootname", "class"]), inner, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=6,
)
_KEYED = [i for i, line in enumerate(BASE.splitlines()) if " = " in line]
_EXTRA_LINES = ["[[slots]]", "[slots]", "slots = 1", "[device.x]", "a.b.c = 1", "[health.commands]",
                '[[slots]]\nbootname = "A"\npath = "a.img"', '[[slots]]\nbootname = "C"\npath = "b.img"']


@st.composite
def toml_ish(draw: st.DrawFn) -> str:
    lines = BASE.splitlines()
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.sampled_from(_KEYED))
        lines[i] = f"{lines[i].split(' = ')[0]} = {draw(_VALUES)}"
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(_EXTRA_LINES)))
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=20)) + text[at:]
    return text


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=toml_ish())
def test_generated_configs_load_or_fail_with_one_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                                text: str) -> None:
    p = tmp_path_factory.getbasetemp() / "fuzz-agent.toml"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    message = ""
    try:
        config.load(p)
    except ConfigError as e:  # anything else escapes and fails the test
        message = str(e)
    assert message == "" or (message.startswith(str(p)) and "\n" not in message)
