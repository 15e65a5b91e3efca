"""The agent's TOML configuration, read into frozen dataclasses.

Unknown keys, wrong types and out-of-range values are `ConfigError`s naming the
file, table and key. Relative paths are resolved against the config file's
directory (so a simulated device directory is self-contained). The field-by-field
reference is docs/config.md.
"""

from __future__ import annotations

import os
import re
import reprlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.console.config import ConsoleConfig, load_console
from agent.errors import ConfigError
from agent.etcmerge import EtcConfig, OnConflict, Policy
from agent.mqtt.config import MqttConfig, load_mqtt
from hw import slotid
from hw.bootloader import BACKENDS
from hw.watchdog import WATCHDOG_BACKENDS
from ota_common.fsutil import read_regular

MAX_CONFIG = 256 * 1024
MAX_TRIES = 15  # boot attempts for a new slot: 1..MAX_TRIES
MAX_SLOTS = 64  # [[slots]] tables; every pair is compared by identity
MAX_KEY_PARTS = 32  # tomllib's time is quadratic in the parts of one dotted key
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"\n]*"|'[^'\n]*')"""
_DEEP_KEY = re.compile(rf"(?<![A-Za-z0-9_-])(?:{_KEY_PART}\s*\.\s*){{{MAX_KEY_PARTS},}}")  # from word starts: linear


@dataclass(frozen=True, slots=True)
class SlotConfig:
    bootname: str
    slot_class: str
    path: Path


@dataclass(frozen=True, slots=True)
class HealthConfig:
    deadline: float = 300.0
    commands: tuple[tuple[str, ...], ...] = ()
    units: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WatchdogConfig:
    backend: str = "none"  # dev | sim | none
    path: Path = Path("/dev/watchdog")
    timeout: int = 30
    # Seconds after the kernel started by which a trial boot's boot-check must have
    # taken the watchdog over from the early trial watchdog (agent/trialwatch.py).
    trial_deadline: int = 600
    # Seconds boot-check has to open the watchdog after the early unit handed it over.
    handover_timeout: int = 120


@dataclass(frozen=True, slots=True)
class DownloadConfig:
    """Limits every bundle source applies (see docs/config.md, `[download]`)."""

    connect_timeout: float = 30.0  # seconds to resolve, connect and finish the TLS handshake
    stall_bytes: int = 1024  # fewer than this many bytes ...
    stall_seconds: float = 60.0  # ... in this many seconds of waiting fails the source
    deadline: float = 0.0  # seconds for the whole download; 0 = none
    max_bytes: int = 1 << 40  # no bundle is larger; a source sending more is cut off
    # HTTP(S) only: resume and retries (agent.ranged), TLS, headers, proxy
    retries: int = 8  # attempts after a failure that brought no new byte (0: fail at the first)
    retry_backoff: float = 1.0  # seconds before the first retry, doubling (with jitter) ...
    retry_backoff_max: float = 60.0  # ... up to this
    ca_file: Path | None = None  # PEM CA bundle trusted instead of the system store
    client_cert: Path | None = None  # PEM client certificate (chain) for mutual TLS ...
    client_key: Path | None = None  # ... and its key (None: in client_cert)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # extra request headers; never logged
    proxy: str | None = None  # http://host:port (CONNECT for https URLs, absolute-form for http)
    no_proxy: tuple[str, ...] = ()  # host names (and their subdomains) reached directly; "*": all
    registry_credentials: Path | None = None  # file holding USER:PASSWORD for oci:// registries
    # adaptive download (agent.adaptive): fetch by Range only what no local slot holds
    adaptive: bool = False  # opt-in: it adds Range requests to every http(s)/oci:// install
    max_download_bytes: int = 0  # refuse an install that would download more (0: no limit)
    max_download_ratio: float = 0.0  # ... or more than this fraction of the bundle (0: no limit)
    coalesce_gap: int = 64 << 10  # adaptive: gaps up to this between needed payloads are read through


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The local API socket `ota-agent run` serves and the CLI talks to (docs/api.md)."""

    enabled: bool = True
    socket: Path = Path("/run/edge-ota/agent.sock")
    mode: int = 0o660  # who may connect: the socket file's permission bits ...
    group: str | int | None = None  # ... and its group (a name or a gid); None: the agent's own
    max_clients: int = 16
    idle_timeout: float = 60.0  # seconds a connection may sit with nothing asked and nothing followed


@dataclass(frozen=True, slots=True)
class ProvisionConfig:
    """`[provision]`: where `ota-agent provision` keeps the identity and its record (docs/factory.md)."""

    dir: Path = Path("/var/lib/edge-ota/provision")  # identity key, CSR, certificate, provisioning record
    device_config: Path = Path("/etc/edge-ota/agent.toml")  # the device's config, written by provision
    key_type: str = "ed25519"  # ed25519 | p256: the device key made on the device
    broker: str | None = None  # mqtt[s]://host:port written into the device config's [mqtt]


KEY_TYPES = ("ed25519", "p256")


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    compatible: str
    state_dir: Path
    keyring: Path
    cmdline: Path
    bootloader: str
    bootloader_path: Path
    tries: int
    reboot_command: tuple[str, ...]
    slots: tuple[SlotConfig, ...]
    health: HealthConfig
    watchdog: WatchdogConfig
    download: DownloadConfig = DownloadConfig()
    mqtt: MqttConfig | None = None  # [mqtt]: jobs and reports over a broker (docs/mqtt.md)
    api: ApiConfig = ApiConfig()
    etc: EtcConfig = EtcConfig()  # noqa: RUF009 - frozen; [etc]: /etc kept across updates (agent.etcmerge)
    console: ConsoleConfig = ConsoleConfig()  # noqa: RUF009 (frozen) [console]: serial ports (docs/console.md)
    provision: ProvisionConfig = ProvisionConfig()

    @property
    def bootnames(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.bootname for s in self.slots))

    def slot(self, slot_class: str, bootname: str) -> SlotConfig | None:
        for s in self.slots:
            if s.slot_class == slot_class and s.bootname == bootname:
                return s
        return None


class _Table:
    def __init__(self, file: Path, name: str, doc: Any, known: set[str]) -> None:
        self.file = file
        self.name = name
        where = f"[{name}]" if name else ""
        if not isinstance(doc, dict):
            raise ConfigError(str(file), where, "must be a table")
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(str(file), where, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        self.doc = doc

    def err(self, key: str, message: str) -> ConfigError:
        return ConfigError(str(self.file), f"[{self.name}] {key}", message)

    def string(self, key: str, default: str | None = None) -> str:
        v = self.doc.get(key, default)
        if v is None:
            raise self.err(key, "is required")
        if not isinstance(v, str) or not v:
            raise self.err(key, f"must be a non-empty string, got {_show(v)}")
        return v

    def path(self, key: str, default: str | None = None) -> Path:
        text = self.string(key, default)
        if "\0" in text:
            raise self.err(key, "must not contain a NUL character")
        p = Path(text)
        if p.is_absolute():
            return p
        full = self.file.parent / p
        try:
            if full.name in ("", ".."):
                return full.resolve()
            # The directory is resolved, the last component kept: a symlink there stays
            # visible to the O_NOFOLLOW opens of the agent's own files.
            return full.parent.resolve() / full.name
        except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop
            raise self.err(key, f"cannot resolve {text!r}: {e}") from None

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        v = self.doc.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.err(key, f"must be an integer, got {_show(v)}")
        if not low <= v <= high:
            raise self.err(key, f"= {_show(v)} is outside {low}..{high}")
        return v

    def number(self, key: str, default: float, low: float, high: float) -> float:
        v = self.doc.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise self.err(key, f"must be a number, got {_show(v)}")
        if not low <= v <= high:
            raise self.err(key, f"= {_show(v)} is outside {low}..{high}")
        return float(v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self.doc.get(key, default)
        if not isinstance(v, bool):
            raise self.err(key, f"must be true or false, got {_show(v)}")
        return v

    def strings(self, key: str) -> tuple[str, ...]:
        v = self.doc.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise self.err(key, "must be a list of non-empty strings")
        return tuple(v)

    def commands(self, key: str) -> tuple[tuple[str, ...], ...]:
        v = self.doc.get(key, [])
        ok = isinstance(v, list) and all(
            isinstance(c, list) and c and all(isinstance(x, str) for x in c) for c in v
        )
        if not ok:
            example = '[["systemctl", "is-system-running"]]'
            raise self.err(key, f"must be a list of commands, each a list of strings, e.g. {example}")
        return tuple(tuple(c) for c in v)


def _show(v: object) -> str:
    """A config value for an error message: short, and never failing (an integer
    of thousands of digits cannot even be turned into text)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return f"an integer of {v.bit_length()} bits"
    try:
        return reprlib.repr(v)
    except (ValueError, RecursionError):
        return f"a {type(v).__name__}"


def load(path: Path) -> Config:
    """The config at `path`; every problem with it, whatever the file holds, is
    one `ConfigError` naming the file (and table and key where known)."""
    try:
        return _load(path)
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, OSError, RuntimeError) as e:
        # A last line of defence: each check below names its key; this keeps any
        # case they miss one line instead of a traceback.
        raise ConfigError(str(path), "", f"invalid config ({type(e).__name__}: {e})") from None


def _parse(path: Path) -> dict[str, Any]:
    try:
        raw = read_regular(Path(os.path.realpath(path)), MAX_CONFIG + 1)
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read: {e.strerror}") from None
    except ValueError as e:  # a NUL in the path
        raise ConfigError(str(path), "", f"cannot read: {e}") from None
    if len(raw) > MAX_CONFIG:
        raise ConfigError(str(path), "", f"larger than {MAX_CONFIG} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), "", f"not UTF-8: byte {e.start} is {raw[e.start : e.start + 1]!r}") from None
    deep = _DEEP_KEY.search(text)
    if deep is not None:
        line = text.count("\n", 0, deep.start()) + 1
        raise ConfigError(str(path), "", f"line {line}: a dotted key or table name of more than {MAX_KEY_PARTS} parts")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "", f"not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(str(path), "", "not valid TOML: nested too deeply") from None
    except Exception as e:  # tomllib lets int() and datetime() errors through (4300-digit integers, ...)
        raise ConfigError(str(path), "", f"not valid TOML: {type(e).__name__}: {e}") from None


def _load(path: Path) -> Config:
    doc = _parse(path)
    tables = {"device", "bootloader", "slots", "health", "watchdog", "download", "mqtt", "api", "etc"}
    top = _Table(path, "", doc, tables | {"console", "provision"})
    wd_keys = {"backend", "path", "timeout", "trial_deadline", "handover_timeout"}
    wd = _Table(path, "watchdog", doc.get("watchdog", {}), wd_keys)
    device = _Table(path, "device", doc.get("device", {}), {"compatible", "state_dir", "keyring", "cmdline"})
    boot = _Table(path, "bootloader", doc.get("bootloader", {}), {"backend", "path", "tries", "reboot_command"})
    health = _Table(path, "health", doc.get("health", {}), {"deadline", "commands", "units"})
    backend = boot.string("backend")
    if backend not in BACKENDS:
        raise boot.err("backend", f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    raw_slots = top.doc.get("slots")
    if not isinstance(raw_slots, list) or not raw_slots:
        raise ConfigError(str(path), "[[slots]]", "at least two [[slots]] tables are required")
    if len(raw_slots) > MAX_SLOTS:
        raise ConfigError(str(path), "[[slots]]", f"{len(raw_slots)} [[slots]] tables, at most {MAX_SLOTS}")
    slots, spelled = [], []
    for i, item in enumerate(raw_slots):
        t = _Table(path, f"slots.{i}", item, {"bootname", "class", "path"})
        slots.append(SlotConfig(t.string("bootname"), t.string("class", "rootfs"), t.path("path")))
        spelled.append(t.string("path"))
    _check_slots(path, slots, spelled)
    wd_backend = wd.string("backend", "none")
    if wd_backend not in WATCHDOG_BACKENDS:
        choices = ", ".join(WATCHDOG_BACKENDS)
        raise wd.err("backend", f"unknown watchdog backend {wd_backend!r}; choose one of {choices}")
    reboot = boot.doc.get("reboot_command", ["systemctl", "reboot"])
    if not isinstance(reboot, list) or not all(isinstance(x, str) for x in reboot):
        raise boot.err("reboot_command", "must be a list of strings")
    return Config(
        path=path,
        compatible=device.string("compatible"),
        state_dir=device.path("state_dir", "/var/lib/edge-ota"),
        keyring=device.path("keyring", "/etc/edge-ota/keys"),
        cmdline=device.path("cmdline", "/proc/cmdline"),
        bootloader=backend,
        bootloader_path=boot.path("path"),
        tries=boot.integer("tries", 3, 1, MAX_TRIES),
        reboot_command=tuple(reboot),
        slots=tuple(slots),
        health=HealthConfig(
            deadline=health.number("deadline", 300.0, 1.0, 86400.0),
            commands=health.commands("commands"),
            units=health.strings("units"),
        ),
        watchdog=WatchdogConfig(
            wd_backend,
            wd.path("path", "/dev/watchdog"),
            wd.integer("timeout", 30, 1, 3600),
            wd.integer("trial_deadline", 600, 10, 86400),
            wd.integer("handover_timeout", 120, 1, 3600),
        ),
        download=_download(_Table(path, "download", doc.get("download", {}), DOWNLOAD_KEYS)),
        mqtt=load_mqtt(doc["mqtt"], path) if "mqtt" in doc else None,
        api=_api(_Table(path, "api", doc.get("api", {}), API_KEYS)),
        etc=_etc(_Table(path, "etc", doc.get("etc", {}), ETC_KEYS)),
        console=load_console(doc.get("console", {}), path),
        provision=_provision(_Table(path, "provision", doc.get("provision", {}), PROVISION_KEYS)),
    )


PROVISION_KEYS = {"dir", "device_config", "key_type", "broker"}


def _provision(t: _Table) -> ProvisionConfig:
    d = ProvisionConfig()
    key_type = t.string("key_type", d.key_type)
    if key_type not in KEY_TYPES:
        raise t.err("key_type", f"must be one of {', '.join(KEY_TYPES)}, got {_show(key_type)}")
    broker = t.doc.get("broker")
    if broker is not None:
        broker = t.string("broker")
        if not broker.startswith(("mqtt://", "mqtts://")) or len(broker) > 512:
            raise t.err("broker", f"must be an mqtt:// or mqtts:// URL of at most 512 characters, got {_show(broker)}")
    return ProvisionConfig(
        dir=t.path("dir", str(d.dir)),
        device_config=t.path("device_config", str(d.device_config)),
        key_type=key_type,
        broker=broker,
    )


DOWNLOAD_KEYS = {"connect_timeout", "stall_bytes", "stall_seconds", "deadline", "max_bytes", "retries",
                 "retry_backoff", "retry_backoff_max", "ca_file", "client_cert", "client_key", "headers", "proxy",
                 "no_proxy", "registry_credentials", "adaptive", "max_download_bytes", "max_download_ratio",
                 "coalesce_gap"}
# Headers the HTTP client owns (framing, ranges, the connection): a config cannot override them.
RESERVED_HEADERS = {"host", "range", "if-range", "connection", "content-length", "transfer-encoding", "te",
                    "upgrade", "accept-encoding", "expect", "keep-alive", "trailer", "proxy-connection"}
MAX_HEADERS = 32
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]{0,4096}")
_PROXY = re.compile(r"http://[A-Za-z0-9._\-\[\]:]+/?")


def _download(t: _Table) -> DownloadConfig:
    d = DownloadConfig()
    backoff = t.number("retry_backoff", d.retry_backoff, 0.0, 3600.0)
    proxy = t.doc.get("proxy")
    if proxy is not None and not (isinstance(proxy, str) and _PROXY.fullmatch(proxy)):
        raise t.err("proxy", f"must be an http://HOST:PORT URL, got {_show(proxy)}")
    cert = t.path("client_cert") if "client_cert" in t.doc else None
    if "client_key" in t.doc and cert is None:
        raise t.err("client_key", "needs client_cert")
    return DownloadConfig(
        connect_timeout=t.number("connect_timeout", d.connect_timeout, 0.1, 3600.0),
        stall_bytes=t.integer("stall_bytes", d.stall_bytes, 1, 1 << 30),
        stall_seconds=t.number("stall_seconds", d.stall_seconds, 0.1, 86400.0),
        deadline=t.number("deadline", d.deadline, 0.0, 30 * 86400.0),
        max_bytes=t.integer("max_bytes", d.max_bytes, 1, 1 << 50),
        retries=t.integer("retries", d.retries, 0, 1000),
        retry_backoff=backoff,
        retry_backoff_max=t.number("retry_backoff_max", max(d.retry_backoff_max, backoff), backoff, 86400.0),
        ca_file=t.path("ca_file") if "ca_file" in t.doc else None,
        client_cert=cert,
        client_key=t.path("client_key") if "client_key" in t.doc else None,
        headers=_headers(t),
        proxy=proxy,
        no_proxy=t.strings("no_proxy"),
        registry_credentials=t.path("registry_credentials") if "registry_credentials" in t.doc else None,
        adaptive=t.boolean("adaptive", d.adaptive),
        max_download_bytes=t.integer("max_download_bytes", d.max_download_bytes, 0, 1 << 50),
        max_download_ratio=t.number("max_download_ratio", d.max_download_ratio, 0.0, 1000.0),
        coalesce_gap=t.integer("coalesce_gap", d.coalesce_gap, 0, 32 << 20),
    )


ETC_KEYS = {"merge", "old", "current", "slot_class", "slot_etc", "slot_factory", "on_conflict", "paths"}
MAX_ETC_RULES = 256


def _etc(t: _Table) -> EtcConfig:
    d = EtcConfig()
    merge = t.doc.get("merge", False)
    if not isinstance(merge, bool):
        raise t.err("merge", f"must be true or false, got {_show(merge)}")
    choices = {c.value: c for c in OnConflict}
    on_conflict = t.string("on_conflict", d.on_conflict.value)
    if on_conflict not in choices:
        raise t.err("on_conflict", f"{on_conflict!r} is not one of {', '.join(choices)}")
    raw = t.doc.get("paths", {})
    if not isinstance(raw, dict) or len(raw) > MAX_ETC_RULES:
        raise t.err("paths", f'must be a table of at most {MAX_ETC_RULES} PATTERN = "keep|replace|merge" entries')
    policies = {p.value: p for p in Policy}
    rules = []
    for pattern, value in raw.items():
        if value not in policies or not pattern or pattern.startswith("/") or ".." in pattern.split("/"):
            raise t.err(
                f"paths.{pattern}", f"must be keep, replace or merge for a relative pattern, got {_show(value)}"
            )
        rules.append((pattern, policies[value]))
    for key in ("slot_etc", "slot_factory"):
        value = t.string(key, getattr(d, key))
        if value.startswith("/") or ".." in value.split("/"):
            raise t.err(key, "must be a path relative to the slot's root, without '..'")
    return EtcConfig(
        merge=merge,
        old=t.path("old", str(d.old)),
        current=t.path("current", str(d.current)),
        slot_class=t.string("slot_class", d.slot_class),
        slot_etc=t.string("slot_etc", d.slot_etc),
        slot_factory=t.string("slot_factory", d.slot_factory),
        on_conflict=choices[on_conflict],
        paths=tuple(rules),
    )


def _headers(t: _Table) -> tuple[tuple[str, str], ...]:
    """`headers = { Authorization = "Bearer ..." }`; errors never show a value."""
    v = t.doc.get("headers", {})
    if not isinstance(v, dict):
        raise t.err("headers", 'must be a table of strings, e.g. { Authorization = "Bearer TOKEN" }')
    if len(v) > MAX_HEADERS:
        raise t.err("headers", f"{len(v)} headers, at most {MAX_HEADERS}")
    out = []
    for name, value in v.items():
        if not _HEADER_NAME.fullmatch(name):
            raise t.err("headers", f"{_show(name)} is not a valid header name")
        if name.lower() in RESERVED_HEADERS:
            raise t.err("headers", f"{name!r} is set by the agent itself and cannot be configured")
        if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            raise t.err(f"headers.{name}", "must be a string of printable ASCII, at most 4096 characters")
        out.append((name, value.strip()))
    return tuple(out)


API_KEYS = {"enabled", "socket", "mode", "group", "max_clients", "idle_timeout"}
MAX_SOCKET_NAME = 80  # bytes of the socket's file name; a long directory is reached through /proc/self/fd
_MODE_TEXT = re.compile(r"(?:0o?)?([0-7]{3})")


def _api(t: _Table) -> ApiConfig:
    d = ApiConfig()
    enabled = t.doc.get("enabled", d.enabled)
    if not isinstance(enabled, bool):
        raise t.err("enabled", f"must be true or false, got {_show(enabled)}")
    socket = t.path("socket", str(d.socket))
    if socket.name in ("", ".", "..") or len(os.fsencode(socket.name)) > MAX_SOCKET_NAME:
        raise t.err("socket", f"must end in a file name of 1..{MAX_SOCKET_NAME} bytes, got {_show(socket.name)}")
    return ApiConfig(
        enabled=enabled,
        socket=socket,
        mode=_socket_mode(t),
        group=_socket_group(t),
        max_clients=t.integer("max_clients", d.max_clients, 1, 1024),
        idle_timeout=t.number("idle_timeout", d.idle_timeout, 0.1, 86400.0),
    )


def _socket_mode(t: _Table) -> int:
    """`mode = "0660"` (a string of octal digits) or `mode = 0o660` (a TOML octal integer)."""
    v = t.doc.get("mode", ApiConfig().mode)
    if isinstance(v, str) and (m := _MODE_TEXT.fullmatch(v)):
        mode = int(m.group(1), 8)
    elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0o777:
        mode = v
    else:
        raise t.err("mode", f'must be permission bits such as "0660" or 0o660, got {_show(v)}')
    if mode & 0o600 != 0o600:
        raise t.err("mode", f"= {mode:#05o} must let the owner (the agent) read and write (0o600)")
    if mode & 0o002:
        raise t.err(
            "mode",
            f"= {mode:#05o} would let every local user install, mark and reboot; grant access through `group` instead",
        )
    return mode


def _socket_group(t: _Table) -> str | int | None:
    v = t.doc.get("group")
    if v is None:
        return None
    if isinstance(v, str) and v and len(v) <= 64 and "\0" not in v:
        return v
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 0xFFFFFFFF:
        return v
    raise t.err("group", f"must be a group name or a numeric gid, got {_show(v)}")


def _check_slots(path: Path, slots: list[SlotConfig], spelled: list[str]) -> None:
    seen: dict[tuple[str, str], Path] = {}
    for s in slots:
        key = (s.slot_class, s.bootname)
        if key in seen:
            message = f"two slots of class {s.slot_class!r} with bootname {s.bootname!r}"
            raise ConfigError(str(path), "[[slots]]", message)
        seen[key] = s.path
    bootnames = {s.bootname for s in slots}
    if len(bootnames) < 2:
        raise ConfigError(str(path), "[[slots]]", "an A/B device needs slots with at least two bootnames")
    for cls in {s.slot_class for s in slots}:
        have = {s.bootname for s in slots if s.slot_class == cls}
        if have != bootnames:
            message = f"class {cls!r} has slots for {sorted(have)}, expected one per bootname {sorted(bootnames)}"
            raise ConfigError(str(path), "[[slots]]", message)
    # Every slot is distinct storage: no two paths may name the same file or device
    # (a link, another spelling), or overlap (a partition and its disk, a loop
    # device and its backing file), or an install could write the running slot.
    ids = [slotid.identity(s.path) for s in slots]
    named = [f"slot {s.slot_class} {s.bootname} ({text!r})" for s, text in zip(slots, spelled, strict=True)]
    for i in range(len(slots)):
        for j in range(i + 1, len(slots)):
            reason = slotid.overlap(ids[i], ids[j])
            if reason is not None:
                message = f"{named[i]} and {named[j]} are not distinct storage: {reason}"
                raise ConfigError(str(path), "[[slots]]", message)
