"""The `[mqtt]` table of the agent's configuration, validated into a frozen
`MqttConfig`. `load_mqtt(table, file)` takes the table as `tomllib` parsed it
and the config file's path (for error messages and for resolving relative
paths); unknown keys, wrong types and out-of-range values are `ConfigError`s
naming the file, the table and the key, like the rest of agent/config.py.

Secrets never enter the value: `password_file` is a path, read when the link
is built. The field-by-field reference is docs/mqtt.md ("Configuration").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.mqtt.errors import TopicError
from agent.mqtt.journal import DEFAULT_CAPACITY, MAX_CAPACITY, MIN_CAPACITY
from agent.mqtt.reporter import DEFAULT_WINDOW
from agent.mqtt.topics import DEFAULT_PREFIX, check_name, check_prefix
from ota_common.text import clean

MAX_GROUPS = 32
MAX_SESSION_EXPIRY = 0xFFFFFFFF  # MQTT 5: "never expires"
DEFAULT_SESSION_EXPIRY = 7 * 24 * 3600
KEYS = frozenset({
    "broker", "device_id", "groups", "protocol", "username", "password_file", "ca", "cert", "key",
    "keepalive", "topic_prefix", "session_expiry", "reconnect_min", "reconnect_max", "journal_jobs",
    "report_window", "reboot_after_install",
})


class MqttProtocol(Enum):
    V311 = "3.1.1"
    V5 = "5"


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str
    port: int
    tls: bool
    device_id: str
    groups: tuple[str, ...] = ()
    protocol: MqttProtocol = MqttProtocol.V311
    username: str | None = None
    password_file: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    keepalive: int = 60
    topic_prefix: str = DEFAULT_PREFIX
    session_expiry: int = DEFAULT_SESSION_EXPIRY
    reconnect_min: int = 1
    reconnect_max: int = 120
    journal_jobs: int = DEFAULT_CAPACITY
    report_window: int = DEFAULT_WINDOW
    reboot_after_install: bool = True  # an install job reboots into the new slot once it is written

    @property
    def broker(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def load_mqtt(table: object, file: Path) -> MqttConfig:
    """The `[mqtt]` table `table` (parsed TOML) of the config file `file`, validated."""
    t = _Checker(table, file)
    host, port, tls = t.broker()
    device_id = t.name("device_id", "device id")
    groups = t.groups()
    cert, key, ca = t.file("cert"), t.file("key"), t.file("ca")
    if (cert is None) != (key is None):
        raise t.err("cert" if cert is None else "key", "cert and key go together: set both or neither")
    if not tls:
        for name, value in (("ca", ca), ("cert", cert)):
            if value is not None:
                raise t.err(name, "is set but the broker URL is mqtt:// (plain TCP); use mqtts:// for TLS")
    password_file = t.file("password_file")
    username = t.string("username")
    if password_file is not None and username is None:
        raise t.err("password_file", "needs a username")
    reconnect_min = t.integer("reconnect_min", 1, 1, 60)
    return MqttConfig(
        host=host, port=port, tls=tls, device_id=device_id, groups=groups,
        protocol=t.protocol(), username=username, password_file=password_file, ca=ca, cert=cert, key=key,
        keepalive=t.integer("keepalive", 60, 5, 3600),
        topic_prefix=t.prefix(),
        session_expiry=t.integer("session_expiry", DEFAULT_SESSION_EXPIRY, 0, MAX_SESSION_EXPIRY),
        reconnect_min=reconnect_min,
        reconnect_max=t.integer("reconnect_max", max(120, reconnect_min), reconnect_min, 3600),
        journal_jobs=t.integer("journal_jobs", DEFAULT_CAPACITY, MIN_CAPACITY, MAX_CAPACITY),
        report_window=t.integer("report_window", DEFAULT_WINDOW, 1, 1000),
        reboot_after_install=t.boolean("reboot_after_install", True),
    )


class _Checker:
    def __init__(self, table: object, file: Path) -> None:
        self.config_file = file
        if not isinstance(table, dict):
            raise ConfigError(str(file), "[mqtt]", "must be a table")
        unknown = sorted(set(table) - KEYS)
        if unknown:
            raise ConfigError(str(file), "[mqtt]",
                              f"unknown key {clean(unknown[0], 40)!r} (known: {', '.join(sorted(KEYS))})")
        self.doc: dict[str, Any] = table

    def err(self, key: str, message: str) -> ConfigError:
        return ConfigError(str(self.config_file), f"[mqtt] {key}", message)

    def string(self, key: str) -> str | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.err(key, f"must be a non-empty string, got {clean(repr(value), 60)}")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.doc.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.err(key, f"must be an integer, got {clean(repr(value), 60)}")
        if not low <= value <= high:
            raise self.err(key, f"= {value} is outside {low}..{high}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.doc.get(key, default)
        if not isinstance(value, bool):
            raise self.err(key, f"must be true or false, got {clean(repr(value), 60)}")
        return value

    def name(self, key: str, what: str) -> str:
        value = self.doc.get(key)
        if value is None:
            raise self.err(key, "is required")
        try:
            return check_name(what, value)
        except TopicError as e:
            raise self.err(key, str(e)) from None

    def groups(self) -> tuple[str, ...]:
        value = self.doc.get("groups", [])
        if not isinstance(value, list):
            raise self.err("groups", "must be a list of group names")
        if len(value) > MAX_GROUPS:
            raise self.err("groups", f"has {len(value)} groups, more than the {MAX_GROUPS} allowed")
        out: list[str] = []
        for item in value:
            try:
                name = check_name("group", item)
            except TopicError as e:
                raise self.err("groups", str(e)) from None
            if name in out:
                raise self.err("groups", f"lists {name!r} twice")
            out.append(name)
        return tuple(out)

    def prefix(self) -> str:
        try:
            return check_prefix(self.doc.get("topic_prefix", DEFAULT_PREFIX))
        except TopicError as e:
            raise self.err("topic_prefix", str(e)) from None

    def protocol(self) -> MqttProtocol:
        value = self.doc.get("protocol", MqttProtocol.V311.value)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        try:
            return MqttProtocol(value)
        except ValueError:
            raise self.err("protocol", f'must be "5" or "3.1.1", got {clean(repr(value), 40)}') from None

    def file(self, key: str) -> Path | None:
        value = self.string(key)
        if value is None:
            return None
        path = Path(value)
        if not path.is_absolute():
            path = (self.config_file.parent / path).resolve()
        if not path.is_file():
            raise self.err(key, f"{clean(str(path), 200)} is not a readable file")
        return path

    def broker(self) -> tuple[str, int, bool]:
        value = self.doc.get("broker")
        if value is None:
            raise self.err("broker", "is required (mqtt://host:port or mqtts://host:port)")
        if not isinstance(value, str) or len(value) > 512:
            raise self.err("broker", "must be a URL of at most 512 characters: mqtt://host:port or mqtts://host:port")
        shown = clean(value, 120)
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as e:
            raise self.err("broker", f"{shown!r} is not a URL: {e}") from None
        if parts.scheme not in ("mqtt", "mqtts"):
            raise self.err("broker", f"{shown!r}: the scheme must be mqtt:// or mqtts://")
        if parts.username is not None or parts.password is not None:
            raise self.err("broker", "credentials do not belong in the URL; use username and password_file")
        if not parts.hostname:
            raise self.err("broker", f"{shown!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise self.err("broker", f"{shown!r}: only mqtt[s]://host[:port] is accepted (no path or query)")
        if port == 0:
            raise self.err("broker", f"{shown!r}: port 0 is not a port")
        tls = parts.scheme == "mqtts"
        return parts.hostname, port or (8883 if tls else 1883), tls
