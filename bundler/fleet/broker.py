"""The operator's connection to the broker: one paho-mqtt 2.x client with the
same URL, TLS and authentication options as a device (`mqtt://host[:port]`,
`mqtts://` with a CA, a client certificate and key, a username with a password
file; MQTT 3.1.1 or 5), blocking helpers to subscribe and publish at QoS 1,
and a queue of what arrives.

`sync()` tells when the retained messages of the subscriptions made so far
have all arrived: the client subscribes to a topic of its own
(`<prefix>/v1/operators/<client id>/sync`), publishes a marker there, and
waits for it. A broker queues a subscription's retained messages when it
handles the SUBSCRIBE, so they reach the client before a message published
after the SUBACK.

Owns the client; what the messages mean is deploy.py's and status.py's.
"""

from __future__ import annotations

import queue
import secrets
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.topics import DEFAULT_PREFIX, LAYOUT, check_prefix
from ota_common.errors import OtaError
from ota_common.text import clean

MAX_PASSWORD = 4096
MAX_MESSAGE = 256 * 1024  # bigger messages are dropped unread (device reports are at most 64 KiB)


class FleetError(OtaError):
    """The operator tool cannot do what it was asked (broker unreachable, refused, bad option)."""


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    url: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    protocol: str = "3.1.1"
    prefix: str = DEFAULT_PREFIX
    client_id: str = ""
    timeout: float = 15.0  # seconds to connect, subscribe or get a PUBACK

    @property
    def root(self) -> str:
        return f"{check_prefix(self.prefix)}/{LAYOUT}"


def parse_broker(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of `mqtt://host[:port]` or `mqtts://host[:port]`."""
    shown = clean(url, 120)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FleetError(f"--broker {shown!r} is not a URL: {e}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise FleetError(f"--broker {shown!r}: the scheme must be mqtt:// or mqtts://")
    if parts.username is not None or parts.password is not None:
        raise FleetError("--broker: credentials do not belong in the URL; use --username and --password-file")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise FleetError(f"--broker {shown!r}: only mqtt[s]://host[:port] is accepted")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class FleetClient:
    def __init__(self, options: BrokerOptions) -> None:
        self.options = options
        self.host, self.port, tls = parse_broker(options.url)
        if options.protocol not in ("3.1.1", "5"):
            raise FleetError(f"--protocol must be 3.1.1 or 5, got {clean(options.protocol, 20)!r}")
        if (options.cert is None) != (options.key is None):
            raise FleetError("--cert and --key go together")
        if not tls and (options.ca or options.cert):
            raise FleetError("--ca/--cert need an mqtts:// broker URL")
        if options.password_file is not None and options.username is None:
            raise FleetError("--password-file needs --username")
        self.client_id = options.client_id or f"ota-fleet-{secrets.token_hex(4)}"
        self.v5 = options.protocol == "5"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
                                  clean_session=None if self.v5 else True)
        if options.username is not None:
            self.client.username_pw_set(options.username, _password(options.password_file))
        if tls:
            try:
                self.client.tls_set(ca_certs=str(options.ca) if options.ca else None,
                                    certfile=str(options.cert) if options.cert else None,
                                    keyfile=str(options.key) if options.key else None,
                                    cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise FleetError(f"TLS set-up failed: {e}") from None
        self.messages: queue.Queue[Message] = queue.Queue()
        self._connack: queue.Queue[ReasonCode | str] = queue.Queue()
        self._acks: dict[int, threading.Event] = {}
        self._granted: dict[int, list[ReasonCode]] = {}
        self._lock = threading.Lock()
        self.sync_topic = f"{options.root}/operators/{self.client_id}/sync"
        self._sync_token = ""
        self._synced = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = lambda *_: self._connack.put("the connection failed")
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    # ---- paho callbacks (its network thread) ------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self._connack.put(reason)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason: ReasonCode,
                       properties: Properties | None) -> None:
        self._connack.put(f"disconnected: {reason}")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return
        payload = bytes(message.payload)
        if topic == self.sync_topic:
            if payload == self._sync_token.encode():
                self._synced.set()
            return
        if len(payload) <= MAX_MESSAGE:
            self.messages.put(Message(topic, payload, bool(message.retain)))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        with self._lock:
            self._granted[mid] = reasons
            self._acks.setdefault(mid, threading.Event()).set()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        with self._lock:
            self._granted[mid] = [reason]
            self._acks.setdefault(mid, threading.Event()).set()

    def _wait_ack(self, mid: int, what: str) -> list[ReasonCode]:
        with self._lock:
            event = self._acks.setdefault(mid, threading.Event())
        if not event.wait(self.options.timeout):
            raise FleetError(f"no {what} from {self.options.url} within {self.options.timeout:g} s")
        with self._lock:
            return self._granted.pop(mid, [])

    # ---- blocking API -----------------------------------------------------------------------------------

    def connect(self) -> FleetClient:
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            raise FleetError(f"cannot connect to {self.options.url}: {clean(e, 200)}") from None
        self.client.loop_start()
        try:
            answer = self._connack.get(timeout=self.options.timeout)
        except queue.Empty:
            answer = f"no CONNACK within {self.options.timeout:g} s"
        if isinstance(answer, str) or answer.is_failure:
            self.close()
            raise FleetError(f"{self.options.url} refused the connection: {clean(str(answer), 120)}")
        return self

    def subscribe(self, filters: list[str]) -> None:
        if not filters:
            return
        result, mid = self.client.subscribe([(f, 1) for f in filters])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise FleetError(f"subscribing failed: {paho.error_string(result)}")
        refused = [code for code in self._wait_ack(mid, "SUBACK") if code.is_failure]
        if refused:
            raise FleetError(f"the broker refused a subscription: {clean(str(refused[0]), 120)}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise FleetError(f"publishing on {clean(topic, 200)} failed: {paho.error_string(info.rc)}")
        codes = self._wait_ack(info.mid, "PUBACK")
        if codes and codes[0].is_failure:
            raise FleetError(f"the broker refused the message on {clean(topic, 200)}: {clean(str(codes[0]), 120)}")

    def sync(self) -> None:
        """Return once every retained message of the subscriptions made so far has arrived."""
        self._synced.clear()
        self._sync_token = secrets.token_hex(8)
        self.subscribe([self.sync_topic])
        self.publish(self.sync_topic, self._sync_token.encode())
        if not self._synced.wait(self.options.timeout):
            raise FleetError(f"the broker did not deliver this client's own marker within {self.options.timeout:g} s"
                             f" (may this client read and write {self.sync_topic}?)")

    def next(self, timeout: float) -> Message | None:
        try:
            return self.messages.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def drain(self) -> list[Message]:
        out: list[Message] = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> FleetClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PASSWORD + 1)
    except OSError as e:
        raise FleetError(f"--password-file {path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_PASSWORD:
        raise FleetError(f"--password-file {path}: larger than {MAX_PASSWORD} bytes")
    try:
        return raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise FleetError(f"--password-file {path}: not UTF-8 text") from None
