"""Who may run a state-changing command on the serial console: a plain
confirmation when no technician keys are configured, otherwise an Ed25519
challenge-response (docs/console.md, "Authentication").

A challenge is one line of text the technician's key signs as-is:

    edge-ota console challenge v1 device=ID nonce=HEX expires=UNIX command=LINE

- device-specific: it names this device, so a signature is worth nothing on another;
- bound to the command line it authorises (a signature for `status`-like harmless
  work cannot be spent on `reboot`);
- a fresh 128-bit nonce, answerable until `expires` (`challenge_ttl` seconds), once:
  the nonce is forgotten at the first answer, right or wrong, so a replayed
  response finds nothing to answer.

Failed answers are counted: after `max_failures` within `lockout` seconds the
console issues no challenge until the lockout passed. Every failure, and the
lockout, is an outbox event (`console-auth` / `failed`), so the fleet sees them;
attempts refused while locked are not each recorded (a flood cannot fill the outbox).

Owns challenges, their checks and the failure count; not the session.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature

from agent.events import Event, EventType, Result
from bundler.format.signing import Keyring
from ota_common.errors import OtaError
from ota_common.frames import CHALLENGE_PREFIX
from ota_common.text import clean

log = logging.getLogger(__name__)

EVENT = EventType.CONSOLE_AUTH
MAX_SIGNATURE_TEXT = 200  # base64 of a 64-byte signature is 88 characters


class AuthError(OtaError):
    """A challenge response was refused (one line saying why)."""


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: str
    text: str
    command: str
    expires: float  # wall clock (the text carries it)


Record = Callable[[Event], object]


class Gate:
    """Challenges and their answers for one console (kept across sessions)."""

    def __init__(self, keyring: Keyring | None, device_id: str, *, ttl: float, max_failures: int, lockout: float,
                 record: Record, clock: Callable[[], float] = time.time) -> None:
        self.keyring = keyring
        self.device_id = device_id
        self.ttl = ttl
        self.max_failures = max_failures
        self.lockout = lockout
        self.record = record
        self.clock = clock
        self._open: dict[str, Challenge] = {}  # at most one: a new challenge replaces the last
        self._failures: list[float] = []
        self._locked_until = 0.0

    @property
    def required(self) -> bool:
        return self.keyring is not None

    def locked_for(self) -> float:
        return max(0.0, self._locked_until - self.clock())

    def issue(self, command: str) -> Challenge:
        left = self.locked_for()
        if left > 0:
            raise AuthError(f"locked: too many failed challenge responses; try again in {left:.0f} s")
        nonce = secrets.token_hex(16)
        expires = self.clock() + self.ttl
        text = f"{CHALLENGE_PREFIX}device={self.device_id} nonce={nonce} expires={int(expires)} command={command}"
        challenge = Challenge(nonce, text, command, expires)
        self._open = {nonce: challenge}
        return challenge

    def answer(self, nonce: str, signature: str) -> Challenge:
        """The challenge `nonce` names, when `signature` (base64) is a technician's
        signature of its text, in time; AuthError otherwise (and the failure counted)."""
        left = self.locked_for()
        if left > 0:
            raise AuthError(f"locked: too many failed challenge responses; try again in {left:.0f} s")
        challenge = self._open.pop(nonce, None)
        if challenge is None:
            self._fail(f"a response to an unknown or already used challenge {clean(nonce, 40)!r} (replayed?)")
        assert challenge is not None
        if self.clock() > challenge.expires:
            self._fail(f"the challenge for {clean(challenge.command, 80)!r} expired")
        try:
            raw = base64.b64decode(signature[:MAX_SIGNATURE_TEXT], validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        assert self.keyring is not None
        for key in self.keyring.keys.values():
            try:
                key.verify(raw, challenge.text.encode())
            except (InvalidSignature, ValueError):
                continue
            self._failures.clear()
            log.info("console: challenge for %r answered by a technician key", clean(challenge.command, 80))
            return challenge
        self._fail(f"the response for {clean(challenge.command, 80)!r} is not signed by a technician key")
        raise AssertionError("unreachable")

    def _fail(self, reason: str) -> None:
        now = self.clock()
        self._failures = [t for t in self._failures if now - t < self.lockout] + [now]
        self._open.clear()
        self.record(Event(event=EVENT, result=Result.FAILED, reason=f"console: {reason}"))
        if len(self._failures) >= self.max_failures:
            self._locked_until = now + self.lockout
            self._failures.clear()
            self.record(Event(event=EVENT, result=Result.FAILED,
                              reason=f"console: {self.max_failures} failed responses; locked for {self.lockout:g} s"))
            raise AuthError(f"{reason}; too many failures: locked for {self.lockout:g} s")
        raise AuthError(reason)
