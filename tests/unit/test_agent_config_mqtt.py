"""The `[mqtt]` table in agent.toml: absent means no MQTT front end; present,
it is validated by `agent.mqtt.config.load_mqtt` as part of loading the
config, so a wrong key is the same one-line ConfigError naming file, table
and key as every other table's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from tests.unit.test_agent_config import write


def test_without_an_mqtt_table_there_is_no_mqtt_config(tmp_path: Path) -> None:
    assert config.load(write(tmp_path)).mqtt is None


def test_an_mqtt_table_is_loaded_with_reboot_after_install_on_by_default(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[mqtt]\nbroker = "mqtt://127.0.0.1:1884"\ndevice_id = "gw-1"\n'
                                      'groups = ["lab"]'))
    assert cfg.mqtt is not None
    assert (cfg.mqtt.broker, cfg.mqtt.device_id, cfg.mqtt.groups) == ("mqtt://127.0.0.1:1884", "gw-1", ("lab",))
    assert cfg.mqtt.reboot_after_install is True
    off = config.load(write(tmp_path, '[mqtt]\nbroker = "mqtt://b"\ndevice_id = "gw-1"\nreboot_after_install = false'))
    assert off.mqtt is not None
    assert off.mqtt.reboot_after_install is False


@pytest.mark.parametrize(("table", "message"), [
    ('device_id = "gw/1"', r"\[mqtt\] device_id: device id: 'gw/1' is not a valid name"),
    ('device_id = "gw-1"\nreboot_after_install = "yes"', r"\[mqtt\] reboot_after_install: must be true or false"),
    ('device_id = "gw-1"\ncolour = 1', r"\[mqtt\].*unknown key 'colour'"),
])
def test_a_wrong_mqtt_key_is_one_error_naming_file_table_and_key(tmp_path: Path, table: str, message: str) -> None:
    path = write(tmp_path, f'[mqtt]\nbroker = "mqtt://b"\n{table}')
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + message):
        config.load(path)
