"""The [mqtt] table: a valid one becomes an MqttConfig with documented
defaults; every wrong key, type or value is a ConfigError naming the file,
the table and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.mqtt.config import MqttConfig, MqttProtocol, load_mqtt


def table(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"broker": "mqtt://broker.lan", "device_id": "gw-1"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def test_a_minimal_table_gets_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load_mqtt(table(), tmp_path / "agent.toml")
    assert cfg == MqttConfig(host="broker.lan", port=1883, tls=False, device_id="gw-1")
    assert cfg.protocol is MqttProtocol.V311
    assert cfg.topic_prefix == "edge-ota"
    assert cfg.broker == "mqtt://broker.lan:1883"


def test_a_full_tls_table_resolves_relative_paths_against_the_config_file(tmp_path: Path) -> None:
    for name in ("ca.pem", "dev.crt", "dev.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "pass").write_text("s3cret-value\n")
    cfg = load_mqtt(
        table(broker="mqtts://[::1]", groups=["canary", "plant-7"], protocol=5, username="gw-1",
              password_file="pass", ca="ca.pem", cert="dev.crt", key="dev.key", keepalive=30,
              topic_prefix="acme/ota", session_expiry=3600, reconnect_min=2, reconnect_max=60,
              journal_jobs=64, report_window=4),
        tmp_path / "agent.toml",
    )
    assert (cfg.host, cfg.port, cfg.tls) == ("::1", 8883, True)
    assert cfg.broker == "mqtts://[::1]:8883"
    assert cfg.groups == ("canary", "plant-7")
    assert cfg.protocol is MqttProtocol.V5
    assert cfg.ca == tmp_path / "ca.pem"
    assert cfg.password_file == tmp_path / "pass"
    assert (cfg.keepalive, cfg.session_expiry, cfg.reconnect_min, cfg.reconnect_max) == (30, 3600, 2, 60)
    assert "s3cret-value" not in repr(cfg)  # the secret itself never enters the value


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"colour": "red"}, "[mqtt]", "unknown key 'colour'"),
        ({"broker": ...}, "[mqtt] broker", "is required"),
        ({"broker": "tcp://h:1883"}, "[mqtt] broker", "scheme must be mqtt:// or mqtts://"),
        ({"broker": "mqtt://u:p@h"}, "[mqtt] broker", "credentials do not belong in the URL"),
        ({"broker": "mqtt://h/topic"}, "[mqtt] broker", "no path or query"),
        ({"broker": "mqtt://h:99999"}, "[mqtt] broker", "is not a URL"),
        ({"broker": "mqtt://h:0"}, "[mqtt] broker", "port 0"),
        ({"broker": "mqtt://"}, "[mqtt] broker", "has no host"),
        ({"broker": 1883}, "[mqtt] broker", "must be a URL"),
        ({"device_id": ...}, "[mqtt] device_id", "is required"),
        ({"device_id": "gw/1"}, "[mqtt] device_id", "is not a valid name"),
        ({"device_id": "gw+"}, "[mqtt] device_id", "is not a valid name"),
        ({"device_id": "#"}, "[mqtt] device_id", "is not a valid name"),
        ({"device_id": "x" * 65}, "[mqtt] device_id", "is not a valid name"),
        ({"groups": "canary"}, "[mqtt] groups", "must be a list"),
        ({"groups": ["a", "a"]}, "[mqtt] groups", "lists 'a' twice"),
        ({"groups": ["a/b"]}, "[mqtt] groups", "is not a valid name"),
        ({"groups": [f"g{i}" for i in range(33)]}, "[mqtt] groups", "more than the 32 allowed"),
        ({"protocol": "4"}, "[mqtt] protocol", 'must be "5" or "3.1.1"'),
        ({"protocol": 3}, "[mqtt] protocol", 'must be "5" or "3.1.1"'),
        ({"keepalive": 0}, "[mqtt] keepalive", "outside 5..3600"),
        ({"keepalive": "60"}, "[mqtt] keepalive", "must be an integer"),
        ({"keepalive": True}, "[mqtt] keepalive", "must be an integer"),
        ({"topic_prefix": "a/#"}, "[mqtt] topic_prefix", "is not valid"),
        ({"username": ""}, "[mqtt] username", "must be a non-empty string"),
        ({"ca": "missing.pem"}, "[mqtt] ca", "is not a readable file"),
        ({"reconnect_min": 10, "reconnect_max": 5}, "[mqtt] reconnect_max", "outside 10..3600"),
        ({"journal_jobs": 2}, "[mqtt] journal_jobs", "outside 8..65536"),
    ],
)
def test_bad_values_are_errors_naming_file_table_and_key(
    tmp_path: Path, fields: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_mqtt(table(**fields), tmp_path / "agent.toml")
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'agent.toml'}: {where}")
    assert message in text


def test_tls_files_with_a_plain_url_and_half_a_key_pair_are_refused(tmp_path: Path) -> None:
    for name in ("ca.pem", "dev.crt", "pass"):
        (tmp_path / name).write_text("x")
    cfg = tmp_path / "agent.toml"
    with pytest.raises(ConfigError, match=r"\[mqtt\] ca: is set but the broker URL is mqtt://"):
        load_mqtt(table(ca="ca.pem"), cfg)
    with pytest.raises(ConfigError, match=r"\[mqtt\] key: cert and key go together"):
        load_mqtt(table(broker="mqtts://h", cert="dev.crt"), cfg)
    with pytest.raises(ConfigError, match=r"\[mqtt\] password_file: needs a username"):
        load_mqtt(table(password_file="pass"), cfg)


def test_a_non_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[mqtt\]: must be a table"):
        load_mqtt("mqtt://h", tmp_path / "agent.toml")
