"""The `[console]` table of the agent's configuration, validated into a frozen
`ConsoleConfig` (docs/config.md, docs/console.md). `load_console(table, file)`
takes the table as `tomllib` parsed it and the config file's path (for error
messages and relative paths); unknown keys, wrong types and out-of-range values
are `ConfigError`s naming the file, the table and the key.

Owns the values; not the ports (agent.console.port) nor the keys' contents
(read when the console starts, agent.console.auth).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from ota_common.frames import DEFAULT_PAYLOAD, MAX_PAYLOAD
from ota_common.text import clean

KEYS = frozenset({
    "ports", "baud", "idle_timeout", "technician_keys", "challenge_ttl", "max_failures", "lockout",
    "device_id", "frame_size", "media_roots",
})
BAUDS = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1152000,
         1500000, 2000000, 2500000, 3000000, 3500000, 4000000)
MAX_PORTS = 8


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    ports: tuple[Path, ...] = ()  # served by `ota-agent run`
    baud: int = 115200
    idle_timeout: float = 300.0  # seconds of silence after which a session is reset
    technician_keys: Path | None = None  # a .pub file or a directory of them; None: confirmation only
    challenge_ttl: float = 60.0  # seconds a challenge may be answered
    max_failures: int = 3  # failed responses within `lockout` seconds before the console locks
    lockout: float = 60.0
    device_id: str | None = None  # in every challenge; default: [mqtt] device_id, else the host name
    frame_size: int = DEFAULT_PAYLOAD  # the largest upload payload per frame the device accepts
    media_roots: tuple[Path, ...] = (Path("/media"), Path("/run/media"))  # where collect-logs looks


def load_console(table: object, file: Path) -> ConsoleConfig:
    where = "[console]"
    if not isinstance(table, dict):
        raise ConfigError(str(file), where, "must be a table")
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise ConfigError(str(file), where, f"unknown key {clean(unknown[0], 40)!r} (known: {', '.join(sorted(KEYS))})")
    doc: dict[str, Any] = table
    d = ConsoleConfig()

    def err(key: str, message: str) -> ConfigError:
        return ConfigError(str(file), f"{where} {key}", message)

    def number(key: str, default: float, low: float, high: float) -> float:
        v = doc.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not low <= v <= high:
            raise err(key, f"must be a number in {low:g}..{high:g}, got {clean(repr(v), 60)}")
        return float(v)

    def integer(key: str, default: int, low: int, high: int) -> int:
        v = doc.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise err(key, f"must be an integer in {low}..{high}, got {clean(repr(v), 60)}")
        return v

    def path(key: str, text: object) -> Path:
        if not isinstance(text, str) or not text or "\0" in text:
            raise err(key, f"must be a non-empty path without NUL, got {clean(repr(text), 60)}")
        p = Path(text)
        return p if p.is_absolute() else Path(os.path.abspath(file.parent / p))

    def paths(key: str, default: tuple[Path, ...], most: int) -> tuple[Path, ...]:
        v = doc.get(key)
        if v is None:
            return default
        if not isinstance(v, list) or len(v) > most:
            raise err(key, f"must be a list of at most {most} paths")
        return tuple(path(key, x) for x in v)

    ports = paths("ports", (), MAX_PORTS)
    if len(set(ports)) != len(ports):
        raise err("ports", "names a port twice")
    baud = integer("baud", d.baud, 1, 4_000_000)
    if baud not in BAUDS:
        raise err("baud", f"= {baud} is not a standard rate ({', '.join(map(str, BAUDS))})")
    keys = doc.get("technician_keys")
    device_id = doc.get("device_id")
    if device_id is not None and (not isinstance(device_id, str) or not 1 <= len(device_id) <= 64
                                  or not device_id.isprintable() or " " in device_id):
        raise err("device_id", "must be 1..64 printable characters without spaces")
    return ConsoleConfig(
        ports=ports,
        baud=baud,
        idle_timeout=number("idle_timeout", d.idle_timeout, 1.0, 86400.0),
        technician_keys=None if keys is None else path("technician_keys", keys),
        challenge_ttl=number("challenge_ttl", d.challenge_ttl, 1.0, 3600.0),
        max_failures=integer("max_failures", d.max_failures, 1, 100),
        lockout=number("lockout", d.lockout, 1.0, 86400.0),
        device_id=device_id,
        frame_size=integer("frame_size", d.frame_size, 64, MAX_PAYLOAD),
        media_roots=paths("media_roots", d.media_roots, 16),
    )
