"""The adaptive-download keys of `[download]`: read, defaulted, strictly typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from tests.unit._agent_toml import with_table


def test_adaptive_download_is_off_and_unlimited_by_default(tmp_path: Path) -> None:
    d = config.load(with_table(tmp_path, "download", "")).download
    assert (d.adaptive, d.max_download_bytes, d.max_download_ratio) == (False, 0, 0.0)
    assert d.coalesce_gap == 65536


def test_the_adaptive_keys_are_read(tmp_path: Path) -> None:
    text = "adaptive = true\nmax_download_bytes = 1000000\nmax_download_ratio = 0.25\ncoalesce_gap = 0"
    d = config.load(with_table(tmp_path, "download", text)).download
    assert (d.adaptive, d.max_download_bytes, d.max_download_ratio) == (True, 1_000_000, 0.25)
    assert d.coalesce_gap == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('adaptive = "yes"', r"\[download\] adaptive.*true or false"),
        ("adaptive = 1", r"\[download\] adaptive.*true or false"),
        ("max_download_bytes = -1", r"\[download\] max_download_bytes.*outside"),
        ("max_download_bytes = 1.5", r"\[download\] max_download_bytes.*integer"),
        ("max_download_ratio = -0.1", r"\[download\] max_download_ratio.*outside"),
        ("max_download_ratio = true", r"\[download\] max_download_ratio.*number"),
        ("coalesce_gap = -1", r"\[download\] coalesce_gap.*outside"),
        ("coalesce_gap = 33554433", r"\[download\] coalesce_gap.*outside"),
    ],
)
def test_bad_adaptive_values_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(with_table(tmp_path, "download", text))
