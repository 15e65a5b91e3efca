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


def test_the_http_keys_are_read(tmp_path: Path) -> None:
    text = """retries = 3
retry_backoff = 0.5
retry_backoff_max = 10
ca_file = "ca.pem"
client_cert = "/etc/edge-ota/device.crt"
client_key = "/etc/edge-ota/device.key"
headers = { Authorization = "Bearer abc", X-Fleet = "lab" }
proxy = "http://proxy.example:3128"
no_proxy = ["localhost", ".internal"]"""
    d = config.load(write(tmp_path, text)).download
    assert (d.retries, d.retry_backoff, d.retry_backoff_max) == (3, 0.5, 10.0)
    assert d.ca_file == tmp_path.resolve() / "ca.pem"  # relative to the config file
    assert (d.client_cert, d.client_key) == (Path("/etc/edge-ota/device.crt"), Path("/etc/edge-ota/device.key"))
    assert d.headers == (("Authorization", "Bearer abc"), ("X-Fleet", "lab"))
    assert (d.proxy, d.no_proxy) == ("http://proxy.example:3128", ("localhost", ".internal"))


def test_header_values_never_appear_in_the_config_s_repr() -> None:
    assert "abc" not in repr(DownloadConfig(headers=(("Authorization", "Bearer abc"),)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("retries = -1", r"\[download\] retries.*outside"),
        ("retry_backoff = 5\nretry_backoff_max = 1", r"\[download\] retry_backoff_max.*outside"),
        ('headers = { Range = "bytes=0-" }', r"\[download\] headers: 'Range' is set by the agent itself"),
        ('headers = { Host = "x" }', r"\[download\] headers: 'Host' is set by the agent itself"),
        ('headers = { "Bad Name" = "x" }', r"\[download\] headers: .*not a valid header name"),
        ('headers = { Authorization = "Bearer a\\nInjected: yes" }', r"\[download\] headers.Authorization: must be"),
        ("headers = { Authorization = 5 }", r"\[download\] headers.Authorization: must be"),
        ('proxy = "https://proxy:3128"', r"\[download\] proxy: must be an http://HOST:PORT URL"),
        ('proxy = "socks5://proxy:1080"', r"\[download\] proxy: must be an http://HOST:PORT URL"),
        ('client_key = "k.pem"', r"\[download\] client_key: needs client_cert"),
    ],
)
def test_bad_http_values_name_the_key_and_never_show_a_header_value(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        config.load(write(tmp_path, text))
    assert "Injected" not in str(info.value)
    assert "Bearer" not in str(info.value)
