"""The `[download]` table of agent.toml: defaults, every key, and strict types
and ranges, each error naming the table and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.config import DownloadConfig
from agent.errors import ConfigError
from tests.unit._agent_toml import MINIMAL, with_table


def write(tmp_path: Path, table: str | None) -> Path:
    return with_table(tmp_path, "download", table)


def test_defaults_without_a_download_table() -> None:
    assert DownloadConfig() == DownloadConfig(
        connect_timeout=30.0, stall_bytes=1024, stall_seconds=60.0, deadline=0.0, max_bytes=1 << 40
    )


@pytest.mark.parametrize("table", [None, ""])
def test_an_absent_or_empty_table_gives_the_defaults(tmp_path: Path, table: str | None) -> None:
    assert config.load(write(tmp_path, table)).download == DownloadConfig()


def test_every_key_is_read(tmp_path: Path) -> None:
    text = "connect_timeout = 5\nstall_bytes = 1\nstall_seconds = 0.5\ndeadline = 3600\nmax_bytes = 4096"
    assert config.load(write(tmp_path, text)).download == DownloadConfig(5.0, 1, 0.5, 3600.0, 4096)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stall_seconds = 0", r"\[download\] stall_seconds.*outside"),
        ("stall_bytes = 0", r"\[download\] stall_bytes.*outside"),
        ("stall_bytes = 1.5", r"\[download\] stall_bytes.*must be an integer"),
        ('connect_timeout = "30"', r"\[download\] connect_timeout.*must be a number"),
        ("deadline = -1", r"\[download\] deadline.*outside"),
        ("max_bytes = 0", r"\[download\] max_bytes.*outside"),
        ("deadline = true", r"\[download\] deadline.*must be a number"),
        ("speed_limit = 1", r"\[download\].*unknown key 'speed_limit'"),
    ],
)
def test_bad_values_name_the_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(write(tmp_path, text))


def test_download_must_be_a_table(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text("download = 5\n" + MINIMAL)
    with pytest.raises(ConfigError, match=r"\[download\].*must be a table"):
        config.load(p)
