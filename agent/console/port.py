"""The serial console front end: one port (pyserial), its line discipline
(agent.console.wire), its session (agent.console.session). `ota-agent run` hosts
one `ConsolePort` per `[console] ports` entry; `ota-agent console --port DEV` one.

One thread per port reads what arrives (at most READ_SIZE bytes at a time, with a
short timeout so the idle timeout and stop are noticed) and writes what the session
and the job listeners queued. The wire never makes it crash, hang or grow:

- reads: bounded by the line discipline; a port that fails (a USB serial adapter
  pulled, EIO, the device gone) is closed and opened again every REOPEN seconds
  until it is back, logged once;
- writes: a `write_timeout`; a peer that does not read (flow control held, a cable
  pulled while the device talks) makes the output it missed be dropped, counted,
  and logged once per stall, never a blocked thread;
- the output queue is bounded (MAX_QUEUED lines; the oldest is dropped first);
- a session silent for `idle_timeout` is reset (agent.console.session).

Owns the port's IO; not what lines mean.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import serial

from agent.actions import App
from agent.console.auth import Gate
from agent.console.config import ConsoleConfig
from agent.console.session import Session
from agent.console.wire import BadFrame, Line, Noise, Splitter, TooLong
from agent.errors import ConfigError
from bundler.format.signing import Keyring
from ota_common.errors import OtaError
from ota_common.frames import Frame
from ota_common.text import clean

log = logging.getLogger(__name__)

READ_SIZE = 16384
READ_TIMEOUT = 0.05
WRITE_TIMEOUT = 2.0
REOPEN = 1.0
FRAME_STALE = 0.5  # seconds of silence that end a frame begun but not finished
MAX_QUEUED = 1024
LOG_RING = 200
Opener = Callable[..., Any]


class LogRing(logging.Handler):
    """The agent's last log lines, for `log [N]` and collect-logs."""

    def __init__(self, size: int = LOG_RING) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(clean(self.format(record), 300))
        except Exception:  # a log line must never break the console
            self.handleError(record)

    def last(self, n: int) -> list[str]:
        return list(self.lines)[-n:]


def device_id(app: App, config: ConsoleConfig) -> str:
    if config.device_id:
        return config.device_id
    mqtt = app.device.config.mqtt
    return mqtt.device_id if mqtt is not None else socket.gethostname()


def build_gate(app: App, config: ConsoleConfig) -> Gate:
    keyring = None
    if config.technician_keys is not None:
        try:
            keyring = Keyring.load(config.technician_keys)
        except OtaError as e:
            raise ConfigError(str(app.device.config.path), "[console] technician_keys", str(e)) from None
    return Gate(keyring, device_id(app, config), ttl=config.challenge_ttl, max_failures=config.max_failures,
                lockout=config.lockout, record=app.device.events.emit)


class ConsolePort:
    def __init__(self, config: ConsoleConfig, port: Path | str, *, baud: int | None = None,
                 opener: Opener = serial.Serial) -> None:
        self.config = config
        self.port = str(port)
        self.baud = baud or config.baud
        self.name = f"console {self.port}"
        self.opener = opener
        self.session: Session | None = None
        self._out: collections.deque[str] = collections.deque(maxlen=MAX_QUEUED)
        self._out_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ring = LogRing()
        self._unsubscribe: Callable[[], None] | None = None
        self.dropped_output = 0
        self._ser: Any = None
        self._thread_id: int | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, app: App) -> None:
        gate = build_gate(app, self.config)
        self.session = Session(app, self.config, gate, self.send, self._ring.last)
        logging.getLogger("agent").addHandler(self._ring)
        self._unsubscribe = app.queue.subscribe(self.session.on_job)
        self._thread = threading.Thread(target=self._serve, name=f"console-{Path(self.port).name}", daemon=True)
        self._thread.start()
        log.info("console on %s at %d baud (%s)", self.port, self.baud,
                 "technician challenge" if gate.required else "confirmation only")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._unsubscribe is not None:
            self._unsubscribe()
        logging.getLogger("agent").removeHandler(self._ring)

    def send(self, line: str) -> None:
        """Queue one output line (any thread)."""
        with self._out_lock:
            if len(self._out) == self._out.maxlen:
                self.dropped_output += 1
            wake = not self._out
            self._out.append(line)
            ser = self._ser
        if wake and ser is not None and threading.get_ident() != self._thread_id:
            with contextlib.suppress(Exception):  # a port closing meanwhile
                ser.cancel_read()  # the port's thread writes it now, not after its read times out

    # --- the port's thread -------------------------------------------------------------------

    def _serve(self) -> None:
        failed_before = False
        while not self._stop.is_set():
            try:
                ser = self.opener(self.port, self.baud, timeout=READ_TIMEOUT, write_timeout=WRITE_TIMEOUT)
            except (serial.SerialException, OSError, ValueError) as e:
                if not failed_before:
                    log.warning("console %s: cannot open: %s; trying again every %g s", self.port, clean(e, 200),
                                REOPEN)
                    failed_before = True
                self._stop.wait(REOPEN)
                continue
            if failed_before:
                log.info("console %s: open again", self.port)
            failed_before = False
            try:
                self._talk(ser)
            except (serial.SerialException, OSError) as e:
                log.warning("console %s: the port failed (%s); opening it again", self.port, clean(e, 200))
                failed_before = True
            except Exception:  # a bug must not end the console for good
                log.exception("console %s: internal error; serving the port again", self.port)
            finally:
                with contextlib.suppress(serial.SerialException, OSError):
                    ser.close()
            self._stop.wait(REOPEN if failed_before else 0)

    def _talk(self, ser: Any) -> None:
        with self._out_lock:
            self._ser, self._thread_id = ser, threading.get_ident()
        try:
            self._talk_on(ser)
        finally:
            with self._out_lock:
                self._ser = None

    def _talk_on(self, ser: Any) -> None:
        session = self.session
        assert session is not None
        splitter = Splitter()
        stalled = False
        last_data = time.monotonic()
        while not self._stop.is_set():
            data = ser.read(min(max(ser.in_waiting, 1), READ_SIZE))
            if data:
                last_data = time.monotonic()
                for item in splitter.feed(data):
                    self._item(session, item)
            elif splitter.buffered and time.monotonic() - last_data > FRAME_STALE:
                expired = splitter.expire()
                if expired is not None:
                    self._item(session, expired)
            session.tick()
            stalled = self._flush(ser, stalled)

    def _item(self, session: Session, item: Any) -> None:
        if isinstance(item, Line):
            session.line(item.text)
        elif isinstance(item, Frame):
            session.frame(item)
        elif isinstance(item, BadFrame):
            session.bad_frame(item.transfer, item.offset, item.reason)
        elif isinstance(item, TooLong):
            session.touch()
            session.noise(f"line too long (more than {item.limit} bytes); discarded")
        elif isinstance(item, Noise):
            session.touch()
            session.noise(f"{item.size} bytes of binary noise (not a text line); discarded")

    def _flush(self, ser: Any, stalled: bool) -> bool:
        while True:
            with self._out_lock:
                if not self._out:
                    return stalled
                batch = "".join(line + "\r\n" for line in self._out)
                self._out.clear()
            try:
                ser.write(batch.encode("utf-8", "replace"))
                if stalled:
                    log.info("console %s: the peer reads again", self.port)
                stalled = False
            except serial.SerialTimeoutException:
                self.dropped_output += batch.count("\r\n")
                if not stalled:
                    log.warning("console %s: the peer does not read (flow control or cable); output dropped",
                                self.port)
                stalled = True
                with contextlib.suppress(serial.SerialException, OSError):
                    ser.reset_output_buffer()
                return stalled

