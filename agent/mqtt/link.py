"""The connection to the broker: one paho-mqtt 2.x client, configured from an
`MqttConfig`, kept connected, with the device's presence on a retained topic.

- MQTT 5 or 3.1.1; plain TCP or TLS (a CA file or the system's CAs, optionally
  a client certificate and key; the broker's name is always checked);
  username and a password read from `password_file` when the link starts.
- The client id is the device id and the session persists (3.1.1:
  clean_session False; 5: clean_start False with `session_expiry`), so QoS 1
  jobs published while the device is offline are delivered when it returns.
- Jobs are acknowledged by hand (`manual_ack=True`): the message handler
  journals a job before `handle()` returns, and only then is the PUBACK sent.
  A device that dies in between gets the job again from the broker.
- The last will puts `{"online": false}` on the retained presence topic when
  the socket dies; every connect puts `{"online": true}` there. The link also
  listens to its own presence topic and puts "online" back if a stale will
  (from an old connection the broker noticed late) overwrote it while this
  one is up.
- paho reconnects by itself; the delay before each attempt is drawn at random
  between `reconnect_min` and an exponentially growing cap (at most
  `reconnect_max`): "full jitter", so a fleet does not reconnect in lockstep
  after a broker restart. Subscriptions are made again on every connect.
- With MQTT 5 the CONNECT carries a Maximum Packet Size (`MAX_INCOMING_PACKET`), so
  the broker drops an oversized job instead of making the device read it into
  memory; with 3.1.1 the broker's own limit (mosquitto `message_size_limit`) is
  the only guard before the job's own 16 KiB check.
- Routes: an exact topic with its own handler (`add_route`, the chunk topic of a
  streamed install while it runs), subscribed at once and again on every connect.
- Everything foreign (topics, broker reason strings) is cleaned before logging.

Owns the client and the connection; what a job means is intake.py's, what a
report is reporter.py's.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import ConfigError
from agent.mqtt.config import MqttConfig, MqttProtocol
from agent.mqtt.reporter import LinkListener
from agent.mqtt.schema import MAX_CHUNK, MAX_JOB_BYTES, encode, presence_report
from agent.mqtt.topics import Topics
from ota_common.errors import OtaError
from ota_common.text import clean

log = logging.getLogger(__name__)

MAX_PASSWORD = 4096
# MQTT 5 lets a client cap the packets the broker may send it; a job is at most 16 KiB and a
# streamed bundle chunk at most MAX_CHUNK, so nothing larger is ever read into memory.
MAX_INCOMING_PACKET = MAX_CHUNK + MAX_JOB_BYTES
Handler = Callable[[str, bytes], object]
Clock = Callable[[], datetime]


class LinkError(OtaError):
    """The client could not be set up (TLS files unreadable, bad key, ...)."""


class _Client(paho.Client):
    """paho's client, keeping the reason of the last failed connection attempt (paho's
    `on_connect_fail` is called without it), so the link can log why it cannot connect."""

    last_error: OSError | None = None

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as e:
            self.last_error = e
            raise


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Link:
    def __init__(self, config: MqttConfig, *, clock: Clock = _utcnow, extra_queue: int = 64) -> None:
        self.config = config
        self.topics = Topics.for_device(config.device_id, config.topic_prefix)
        self.clock = clock
        self.handler: Handler | None = None
        self.filters: list[str] = []
        self.routes: dict[str, Handler] = {}  # exact topics with their own handler (a streamed job's chunks)
        self._route_acks: dict[int, threading.Event] = {}
        self._listeners: list[LinkListener] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._attempt = 0
        self._random = random.Random()
        self._started = False
        self._lock = threading.Lock()
        v5 = config.protocol is MqttProtocol.V5
        self._last_failure = ""
        self.client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.device_id,
            clean_session=None if v5 else False,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=True,
        )
        inflight = max(20, config.report_window + 4)
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(inflight + config.report_window + extra_queue)
        self.client.reconnect_delay_set(config.reconnect_min, config.reconnect_min)
        self._will = encode(presence_report(config.device_id, False))
        self._stopping = False
        self.client.will_set(self.topics.presence, self._will, qos=1, retain=True)
        self._setup_security()
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    # ---- set-up -----------------------------------------------------------------------------------

    def _setup_security(self) -> None:
        cfg = self.config
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, self._password())
        if cfg.tls:
            try:
                self.client.tls_set(
                    ca_certs=str(cfg.ca) if cfg.ca else None,
                    certfile=str(cfg.cert) if cfg.cert else None,
                    keyfile=str(cfg.key) if cfg.key else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as e:
                raise LinkError(f"mqtt TLS set-up failed (ca {cfg.ca}, cert {cfg.cert}, key {cfg.key}): {e}") from None

    def _password(self) -> str | None:
        path = self.config.password_file
        if path is None:
            return None
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_PASSWORD + 1)
        except OSError as e:
            raise ConfigError(str(path), "[mqtt] password_file", f"cannot read: {e.strerror}") from None
        if len(raw) > MAX_PASSWORD:
            raise ConfigError(str(path), "[mqtt] password_file", f"larger than {MAX_PASSWORD} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(str(path), "[mqtt] password_file", "is not UTF-8 text") from None
        return text.removesuffix("\n").removesuffix("\r")

    # ---- the application's side ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def ready(self) -> bool:
        """Connected and subscribed: jobs published from now on reach this device."""
        return self._connected.is_set() and self._subscribed.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout) and self.connected

    def add_listener(self, listener: LinkListener) -> None:
        self._listeners.append(listener)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a message; its mid, or None when the client's bounded queue is full.
        Listeners hear `published(mid, ...)` when the broker acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return None
        return info.mid

    def add_route(self, topic: str, handler: Handler, timeout: float) -> bool:
        """Subscribe to `topic` (QoS 1, again on every connect) with its own handler; True
        once the broker granted it within `timeout` seconds."""
        done = threading.Event()
        with self._lock:
            self.routes[topic] = handler
            result, mid = self.client.subscribe(topic, 1)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._route_acks[mid] = done
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:  # not connected: the next connect subscribes
            return self.wait_ready(timeout)
        return done.wait(timeout)

    def remove_route(self, topic: str) -> None:
        with self._lock:
            known = self.routes.pop(topic, None) is not None
        if known and self.connected:
            self.client.unsubscribe(topic)

    def start(self) -> None:
        """Connect in the background and keep connecting; returns at once."""
        cfg = self.config
        if cfg.protocol is MqttProtocol.V5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
            props.SessionExpiryInterval = cfg.session_expiry
            props.MaximumPacketSize = MAX_INCOMING_PACKET
            self.client.connect_async(cfg.host, cfg.port, cfg.keepalive, clean_start=False, properties=props)
        else:
            self.client.connect_async(cfg.host, cfg.port, cfg.keepalive)
        self._started = True
        self.client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Say "offline" (retained), disconnect cleanly, stop the network thread. The broker
        keeps the session, so jobs published meanwhile wait for the next start."""
        if not self._started:
            return
        self._stopping = True
        if self.connected:
            info = self.client.publish(self.topics.presence, encode(presence_report(
                self.config.device_id, False, self.clock())), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as e:
                log.warning("mqtt: could not publish offline presence: %s", clean(e))
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()
        self._subscribed.clear()
        self._started = False
        self._stopping = False

    # ---- paho callbacks (its network thread) -----------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            text = clean(str(reason), 120)
            level = logging.DEBUG if text == self._last_failure else logging.ERROR
            self._last_failure = text
            log.log(level, "mqtt: %s refused the connection: %s", self.config.broker, text)
            return
        self._attempt = 0
        self._last_failure = ""
        self.client.reconnect_delay_set(self.config.reconnect_min, self.config.reconnect_min)
        log.info("mqtt: connected to %s as %s (session %s)", self.config.broker, self.config.device_id,
                 "resumed" if flags.session_present else "new")
        self._publish_online()
        with self._lock:
            routes = list(self.routes)
        wanted = [*self.filters, *routes, self.topics.presence]
        result, self._sub_mid = client.subscribe([(topic, 1) for topic in wanted])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("mqtt: subscribing failed: %s", paho.error_string(result))
        self._connected.set()
        for listener in self._listeners:
            listener.link_up(flags.session_present)

    def _publish_online(self) -> None:
        self.client.publish(self.topics.presence, encode(presence_report(
            self.config.device_id, True, self.clock())), qos=1, retain=True)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        refused = [code for code in reasons if code.is_failure]
        for code in refused:
            log.error("mqtt: the broker refused a subscription: %s", clean(str(code), 120))
        if mid == self._sub_mid and not refused:
            self._subscribed.set()
        with self._lock:
            route = self._route_acks.pop(mid, None)
        if route is not None and not refused:
            route.set()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        reason = clean(self.client.last_error or "unknown reason", 200)
        level = logging.DEBUG if reason == self._last_failure else logging.WARNING
        self._last_failure = reason
        log.log(level, "mqtt: cannot connect to %s: %s", self.config.broker, reason)
        self._backoff()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason: ReasonCode,
                       properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was:
            log.log(logging.INFO if self._stopping else logging.WARNING, "mqtt: disconnected from %s: %s",
                    self.config.broker, clean(str(reason), 120))
            for listener in self._listeners:
                listener.link_down()
        self._backoff()

    def _backoff(self) -> None:
        """Full jitter: the next attempt after a random delay up to an exponentially growing cap."""
        low, high = self.config.reconnect_min, self.config.reconnect_max
        cap = min(high, low << min(self._attempt, 16))
        self._attempt += 1
        delay = self._random.randint(low, max(low, cap))
        self.client.reconnect_delay_set(delay, delay)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            try:
                topic = message.topic
            except UnicodeDecodeError:
                log.warning("mqtt: ignoring a message whose topic is not UTF-8")
                return
            if topic == self.topics.presence:
                self._on_presence(bytes(message.payload))
                return
            route = self.routes.get(topic)
            if route is not None:
                route(topic, bytes(message.payload))
                return
            if self.handler is None:
                log.warning("mqtt: no handler for a message on %s", clean(topic, 200))
                return
            self.handler(topic, bytes(message.payload))
        except Exception:
            log.exception("mqtt: handling a message failed")
        finally:
            client.ack(message.mid, message.qos)

    def _on_presence(self, payload: bytes) -> None:
        if self.connected and not self._stopping and payload == self._will:
            log.info("mqtt: a stale last will marked this device offline; saying online again")
            self._publish_online()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties) -> None:
        ok = not reason.is_failure
        for listener in self._listeners:
            listener.published(mid, ok, "" if ok else str(reason))
