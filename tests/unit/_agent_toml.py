"""The smallest valid agent.toml, for unit tests of one config table."""

from __future__ import annotations

from pathlib import Path

MINIMAL = """
[device]
compatible = "acme"

[bootloader]
backend = "sim"
path = "boot.json"

[[slots]]
bootname = "A"
path = "a.img"

[[slots]]
bootname = "B"
path = "b.img"
"""


def with_table(tmp_path: Path, name: str, body: str | None) -> Path:
    """agent.toml in `tmp_path`: MINIMAL, plus `[name]` holding `body` unless it is None."""
    p = tmp_path / "agent.toml"
    p.write_text(MINIMAL + (f"\n[{name}]\n{body}\n" if body is not None else ""))
    return p
