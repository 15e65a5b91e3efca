"""docs/config.md is the config file reference the README points to: every key
the loader accepts in a table is documented under that table's heading, and
every documented key is one the loader accepts. The loader itself says which
keys it knows (an unknown key's error lists them), so the test asks it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import config as config_mod
from ota_common.errors import OtaError
from tests.unit._agent_toml import MINIMAL

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
_HEADING = re.compile(r"^## `\[\[?([a-z_]+)\]\]?`", re.M)
_ROW_KEYS = re.compile(r"^\| ((?:`[a-z_]+`(?:, )?)+) \|", re.M)


def documented() -> dict[str, set[str]]:
    """Table name -> the keys in the first column of its reference tables."""
    text = DOC.read_text()
    headings = list(_HEADING.finditer(text))
    out: dict[str, set[str]] = {}
    for k, h in enumerate(headings):
        body = text[h.end() : headings[k + 1].start() if k + 1 < len(headings) else len(text)]
        out[h.group(1)] = {key for row in _ROW_KEYS.findall(body) for key in re.findall(r"`([a-z_]+)`", row)}
    return out


def known(tmp_path: Path, table: str) -> set[str]:
    """The keys the loader knows in `table`, from its error for one it does not."""
    header = "[[slots]]" if table == "slots" else f"[{table}]"  # the one array of tables
    text = MINIMAL
    if f"\n{header}\n" in text:
        text = text.replace(f"\n{header}\n", f"\n{header}\nzz_not_a_key = 1\n", 1)
    else:
        text += f"\n{header}\nzz_not_a_key = 1\n"
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(OtaError) as e:
        config_mod.load(path)
    found = re.search(r"unknown key 'zz_not_a_key' \(known: ([a-z_, ]+)\)", str(e.value))
    assert found, f"[{table}]: {e.value}"
    return set(found.group(1).split(", "))


TABLES = sorted(documented())


def test_the_reference_has_the_tables_of_the_file() -> None:
    assert {"device", "bootloader", "slots", "health", "watchdog", "download", "mqtt", "api", "console",
            "provision", "etc"} <= set(TABLES)


@pytest.mark.parametrize("table", TABLES)
def test_every_key_of_a_table_is_documented_and_every_documented_key_exists(tmp_path: Path, table: str) -> None:
    docs, code = documented()[table], known(tmp_path, table)
    assert not code - docs, f"[{table}] keys missing from docs/config.md: {sorted(code - docs)}"
    assert not docs - code, f"[{table}] keys in docs/config.md the loader does not know: {sorted(docs - code)}"
