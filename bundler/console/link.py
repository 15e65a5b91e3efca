"""The technician's side of the serial console: one pyserial port, spoken to in the
console's JSON mode (docs/console.md) so every reply is one object to wait for.

`DeviceLink.call(line)` sends one command and returns the device's reply object.
It answers the device's confirmation itself (`yes`, the technician having typed
the command) or, for a challenge, signs it with the technician's key (only texts
that start with the console's challenge prefix are signed); a reply that says its
result follows ("pending") is followed to the result ("done"), progress lines go
to `on_notice`. Every wait is bounded: `timeout` seconds without a byte from the
device is `LinkLost` (the caller may reconnect).

Owns the host end of the wire; not the upload's send loop (bundler.console.put).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import serial
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ota_common.errors import OtaError
from ota_common.frames import CHALLENGE_PREFIX, Control, parse_control
from ota_common.text import clean

MAX_LINE = 1 << 20  # a reply line longer than this is not the console's
Notice = Callable[[dict[str, Any]], None]
ControlHandler = Callable[[Control], None]


class ConsoleError(OtaError):
    """The device or the line did not do what the console protocol says."""


class LinkLost(ConsoleError):
    """No byte from the device for the timeout, or the port failed."""


class DeviceError(ConsoleError):
    """The device answered with an error."""

    def __init__(self, reply: dict[str, Any]) -> None:
        err = reply.get("error") or {}
        super().__init__(f"{reply.get('command')}: {err.get('message', 'failed')}")
        self.reply = reply
        self.kind = str(err.get("type") or "DeviceError")


class DeviceLink:
    def __init__(self, port: str, *, baud: int = 115200, timeout: float = 10.0, key: Ed25519PrivateKey | None = None,
                 opener: Callable[..., Any] = serial.Serial) -> None:
        self.port = port
        self.baud = baud
        self.timeout = timeout
        self.key = key
        self.opener = opener
        self.ser: Any = None
        self._buf = bytearray()

    # --- the port -----------------------------------------------------------------------

    def open(self) -> None:
        """Open the port and switch the device's session to JSON mode."""
        self.close()
        try:
            self.ser = self.opener(self.port, self.baud, timeout=0.05, write_timeout=self.timeout)
        except (serial.SerialException, OSError, ValueError) as e:
            raise LinkLost(f"cannot open {self.port}: {clean(e, 200)}") from None
        self._buf.clear()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:  # the first bytes may complete a frame the device was waiting for
            self.send_line("")
            self.send_line("json on")
            try:
                reply = self._wait(lambda doc: doc.get("command") == "json", min(1.0, self.timeout))
            except LinkLost:
                continue
            if reply.get("ok"):
                return
        raise LinkLost(f"no console answered on {self.port} within {self.timeout:g} s")

    def close(self) -> None:
        if self.ser is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                self.ser.close()
            self.ser = None

    def write(self, data: bytes) -> None:
        try:
            self.ser.write(data)
        except (serial.SerialException, OSError) as e:  # SerialTimeoutException too: flow control held
            raise LinkLost(f"writing to {self.port} failed: {clean(e, 200)}") from None

    def send_line(self, line: str) -> None:
        self.write(line.encode() + b"\r\n")

    def read_line(self, timeout: float) -> str | None:
        """One line from the device, or None after `timeout` seconds without one."""
        deadline = time.monotonic() + timeout
        while True:
            for sep in (b"\n", b"\r"):
                i = self._buf.find(sep)
                if i >= 0:
                    raw = bytes(self._buf[:i])
                    del self._buf[: i + 1]
                    line = raw.decode("utf-8", "replace").strip()
                    if line:
                        return line
                    break
            else:
                if len(self._buf) > MAX_LINE:
                    self._buf.clear()
                if time.monotonic() >= deadline:
                    return None
                try:
                    data = self.ser.read(max(1, min(self.ser.in_waiting, 65536)))
                except (serial.SerialException, OSError) as e:
                    raise LinkLost(f"reading {self.port} failed: {clean(e, 200)}") from None
                if data:
                    deadline = max(deadline, time.monotonic() + 0.01)
                    self._buf += data

    # --- messages -------------------------------------------------------------------------

    def _wait(self, want: Callable[[dict[str, Any]], bool], timeout: float, *, on_notice: Notice | None = None,
              on_control: ControlHandler | None = None) -> dict[str, Any]:
        """The next reply object `want` accepts; others are notices (or ignored)."""
        while True:
            line = self.read_line(timeout)
            if line is None:
                raise LinkLost(f"no answer from the device on {self.port} for {timeout:g} s")
            control = parse_control(line)
            if control is not None:
                if on_control is not None:
                    on_control(control)
                continue
            if not line.startswith("{"):
                continue  # text from before `json on`, or noise
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if "ok" in doc and want(doc):
                return doc
            if on_notice is not None and "ok" not in doc:
                on_notice(doc)

    def call(self, line: str, *, on_notice: Notice | None = None, on_control: ControlHandler | None = None,
             follow: bool = True, confirm: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The device's reply to `line` (its result, when it follows and `follow`)."""
        name = line.split(maxsplit=1)[0] if line.strip() else ""
        self.send_line(line)
        while True:
            reply = self._wait(lambda doc: doc.get("command") in (name, "response"), self.timeout,
                               on_notice=on_notice, on_control=on_control)
            if reply.get("ok") is False:
                raise DeviceError(reply)
            ask = reply.get("confirm")
            if isinstance(ask, dict):
                self._answer(ask, confirm)
                continue
            if follow and reply.get("pending") and isinstance(reply.get("job"), dict):
                return self.follow(str(reply["job"].get("id")), name, on_notice=on_notice, on_control=on_control)
            return reply

    def follow(self, job_id: str, name: str, *, on_notice: Notice | None = None,
               on_control: ControlHandler | None = None) -> dict[str, Any]:
        """Wait for the result of job `job_id` (each line from the device restarts the timeout)."""
        reply = self._wait(lambda doc: bool(doc.get("done")) and (doc.get("job") or {}).get("id") == job_id,
                           self.timeout, on_notice=on_notice, on_control=on_control)
        if reply.get("ok") is False:
            raise DeviceError(reply)
        return reply

    def _answer(self, ask: dict[str, Any], confirm: Callable[[dict[str, Any]], bool] | None) -> None:
        if confirm is not None and not confirm(ask):
            self.send_line("no")
            raise ConsoleError(f"{clean(ask.get('command'), 200)}: not confirmed")
        challenge = ask.get("challenge")
        if challenge is None:
            self.send_line("yes")
            return
        if self.key is None:
            self.send_line("no")
            raise ConsoleError("the device asks for a technician's signature: give --key TECH.key")
        if not isinstance(challenge, str) or not challenge.startswith(CHALLENGE_PREFIX) or "\n" in challenge:
            self.send_line("no")
            raise ConsoleError(f"refusing to sign {clean(challenge, 120)!r}: not a console challenge")
        signature = base64.b64encode(self.key.sign(challenge.encode())).decode()
        self.send_line(f"response {ask.get('nonce')} {signature}")
