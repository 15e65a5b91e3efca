"""systemd's service notification protocol (sd_notify(3)) with the standard library.

This module owns talking to the service manager: READY=1, STATUS=..., WATCHDOG=1,
STOPPING=1, EXTEND_TIMEOUT_USEC=..., and reading the watchdog interval systemd
asks for ($WATCHDOG_USEC, $WATCHDOG_PID). It does not own when to ping (the
agent's loop) nor the hardware watchdog (``hw/watchdog.py``).

Protocol: the manager puts the path of an AF_UNIX datagram socket in
$NOTIFY_SOCKET (``@name`` means the abstract namespace, the ``@`` standing for a
leading NUL byte); each message is one datagram of newline-separated
``KEY=VALUE`` lines. Without $NOTIFY_SOCKET (not started by systemd, or not
Type=notify) every call is a no-op returning False. A send that fails is a
`WatchdogError`: with WatchdogSec= a lost ping ends in a kill, so it is loud.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from hw.errors import WatchdogError

MAX_MESSAGE = 4096  # systemd reads at most PIPE_BUF bytes per datagram
MAX_STATUS = 1024


class SdNotify:
    def __init__(self, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_path = env.get("NOTIFY_SOCKET", "")
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self.pid = os.getpid() if pid is None else pid

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    # -- messages ----------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up is finished (Type=notify leaves "activating")."""
        return self.send("READY=1", *([] if status is None else [f"STATUS={_one_line(status)}"]))

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status``."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive ping for WatchdogSec=."""
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """Tell systemd the service is unhealthy now: it acts as on a missed ping."""
        return self.send("WATCHDOG=trigger")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([] if status is None else [f"STATUS={_one_line(status)}"]))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start/stop timeout fires (long checks)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def send(self, *assignments: str) -> bool:
        """One datagram of KEY=VALUE lines; False (nothing sent) without NOTIFY_SOCKET."""
        if not self.enabled:
            return False
        for a in assignments:
            key, eq, _ = a.partition("=")
            if not eq or not key or "\n" in a:
                raise WatchdogError(f"sd_notify: {a!r} is not one KEY=VALUE line")
        message = "\n".join(assignments).encode()
        if len(message) > MAX_MESSAGE:
            raise WatchdogError(f"sd_notify: message of {len(message)} bytes exceeds {MAX_MESSAGE}")
        address = notify_address(self.socket_path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message, address)
        except OSError as e:
            raise WatchdogError(f"sd_notify: cannot send to NOTIFY_SOCKET={self.socket_path}: {e.strerror}") from e
        return True

    # -- the watchdog interval -----------------------------------------------------

    def watchdog_usec(self) -> int | None:
        """WatchdogSec= in microseconds when it applies to this process, else None
        (unset, zero, or $WATCHDOG_PID names another process)."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != self.pid:
                    return None
            except ValueError as e:
                raise WatchdogError(f"sd_notify: WATCHDOG_PID={self._watchdog_pid!r} is not a pid") from e
        try:
            usec = int(self._watchdog_usec)
        except ValueError as e:
            raise WatchdogError(f"sd_notify: WATCHDOG_USEC={self._watchdog_usec!r} is not a number") from e
        return usec if usec > 0 else None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        usec = self.watchdog_usec()
        return None if usec is None else usec / 2_000_000


def notify_address(value: str) -> str:
    """The socket address for a $NOTIFY_SOCKET value: an absolute path, or ``@name``
    for the abstract namespace (leading NUL)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise WatchdogError(f"sd_notify: unsupported NOTIFY_SOCKET {value!r} (need an absolute path or @name)")


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_STATUS else flat[: MAX_STATUS - 3] + "..."
