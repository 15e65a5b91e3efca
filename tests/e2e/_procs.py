"""Other processes acting on a simulated device: one that holds the agent's
state lock (what a running install does) until the test lets go, and an agent
command killed at a named crash point (a power cut).

Owns only process handling; every agent action still goes through the real CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

from agent.crashpoint import ENV
from tests.e2e._sim import SimDevice

_HOLD_LOCK = """
import sys
from pathlib import Path
from agent.state import StateStore
with StateStore(Path(sys.argv[1])).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def state_lock_held(device: SimDevice) -> Iterator[None]:
    """Another process holds the device's state lock for the duration of the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(device.dir / "state")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def killed_at(point: str, device: SimDevice, *argv: str) -> None:
    """Run `ota-agent -c CONFIG ARGV...` in a process that SIGKILLs itself at `point`."""
    env = {**os.environ, ENV: point}
    cmd = [sys.executable, "-m", "agent.cli", "-c", str(device.config), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr.decode())
