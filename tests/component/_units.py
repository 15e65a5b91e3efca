"""Reading systemd unit files in tests: `unit_settings(path)` maps `Section.Key`
to every value the file gives it, in order (comments and blank lines skipped)."""

from __future__ import annotations

from pathlib import Path


def unit_settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key}", []).append(value)
    return out
