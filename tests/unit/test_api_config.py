"""The `[api]` table of agent.toml: defaults, every key, permission bits given
as a string or a TOML octal integer, and the modes that would open the agent to
every local user refused, each error naming the table and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.config import ApiConfig
from agent.errors import ConfigError
from tests.unit._agent_toml import with_table


def load(tmp_path: Path, table: str | None) -> ApiConfig:
    return config.load(with_table(tmp_path, "api", table)).api


def test_without_an_api_table_the_daemon_serves_the_standard_socket(tmp_path: Path) -> None:
    assert load(tmp_path, None) == ApiConfig(
        enabled=True, socket=Path("/run/edge-ota/agent.sock"), mode=0o660, group=None, max_clients=16,
        idle_timeout=60.0,
    )


def test_every_key_is_read_and_a_relative_socket_is_beside_the_config(tmp_path: Path) -> None:
    text = 'enabled = false\nsocket = "run/a.sock"\nmode = "0640"\ngroup = "ota"\nmax_clients = 2\nidle_timeout = 5'
    assert load(tmp_path, text) == ApiConfig(False, tmp_path.resolve() / "run" / "a.sock", 0o640, "ota", 2, 5.0)


@pytest.mark.parametrize(("text", "mode"), [('"0660"', 0o660), ('"660"', 0o660), ('"0o600"', 0o600),
                                             ("0o640", 0o640), ("416", 0o640)])
def test_mode_is_octal_text_or_an_integer(tmp_path: Path, text: str, mode: int) -> None:
    assert load(tmp_path, f"mode = {text}").mode == mode


def test_group_may_be_a_gid(tmp_path: Path) -> None:
    assert load(tmp_path, "group = 1000").group == 1000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mode = "0666"', r"\[api\] mode: = 0o666 would let every local user install"),
        ("mode = 0o662", r"\[api\] mode: = 0o662 would let every local user"),
        ('mode = "0460"', r"\[api\] mode: = 0o460 must let the owner"),
        ("mode = 660", r"\[api\] mode: must be permission bits"),  # decimal 660 is not 0o660
        ('mode = "rw-rw----"', r"\[api\] mode: must be permission bits"),
        ('mode = "01660"', r"\[api\] mode: must be permission bits"),
        ("mode = true", r"\[api\] mode: must be permission bits"),
        ('group = ""', r"\[api\] group: must be a group name or a numeric gid"),
        ("group = -1", r"\[api\] group: must be a group name or a numeric gid"),
        ("group = [1]", r"\[api\] group: must be a group name or a numeric gid"),
        ('enabled = "yes"', r"\[api\] enabled: must be true or false"),
        ("max_clients = 0", r"\[api\] max_clients.*outside"),
        ("idle_timeout = 0", r"\[api\] idle_timeout.*outside"),
        ('socket = ""', r"\[api\] socket: must be a non-empty string"),
        (f'socket = "/run/{"x" * 81}"', r"\[api\] socket: must end in a file name of 1..80 bytes"),
        ('socket = "/run/a\\u0000b"', r"\[api\] socket: must not contain a NUL"),
        ("port = 1", r"\[api\]: unknown key 'port'"),
    ],
)
def test_bad_values_name_the_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)
