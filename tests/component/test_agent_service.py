"""`ota-agent run` as systemd runs it: READY=1 with a status line, WATCHDOG=1
pings at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM — over a real
NOTIFY_SOCKET datagram socket created by the test, with the agent as a real
child process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent import sim
from bundler.format.signing import generate_key


def test_run_notifies_ready_pings_the_watchdog_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(os.urandom(1 << 20))
    _, pub = generate_key(tmp_path / "keys")
    config = sim.init(sim.SimSpec(tmp_path / "dev", image, pub, "svc-board", version="7.1"))

    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "-c", str(config), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        messages = []
        deadline = time.monotonic() + 10
        while sum(m.startswith(b"WATCHDOG=1") for m in messages) < 3 and time.monotonic() < deadline:
            messages.append(sock.recv(4096))
        ready = next(m for m in messages if b"READY=1" in m)
        assert b"STATUS=booted A, version 7.1; idle" in ready
        assert sum(m.startswith(b"WATCHDOG=1") for m in messages) >= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert b"STOPPING=1" in sock.recv(4096)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps the child and closes its pipes
        sock.close()
