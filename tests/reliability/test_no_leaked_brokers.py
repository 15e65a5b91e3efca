"""Test daemons die with the test process, however it ends: a RabbitMQ node
(and its epmd) started by a process that is then SIGKILLed is gone soon after,
and the guard every `tests.fixtures.procs.spawn` puts behind a daemon (mosquitto,
the registry, RabbitMQ: tests.fixtures.reaper) takes its group down on SIGINT,
SIGTERM and SIGKILL of its starter alike."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.rabbitmq import rabbitmq_installed
from tests.fixtures.watcher import until

ROOT = Path(__file__).resolve().parents[2]

SLEEPER = """
import sys, time
from pathlib import Path
from tests.fixtures.procs import spawn
proc = spawn(["sleep", "600"], Path(sys.argv[1]))
print(proc.pid, flush=True)
time.sleep(600)
"""

NODE = """
import sys, time
from pathlib import Path
from tests.fixtures.rabbitmq import start_rabbitmq
cluster = start_rabbitmq(Path(sys.argv[1]), 1)
print(cluster.nodes[0].pid, cluster.epmd.pid, flush=True)
time.sleep(600)
"""


def _group_alive(pgid: int) -> bool:
    """Any live (not zombie) process in the group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _starter(script: str, arg: Path) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(arg)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        proc.wait(10)
        raise AssertionError("the starter did not report its daemons")
    return proc, [int(x) for x in line.split()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_guarded_daemon_dies_with_its_starter_on_any_signal(tmp_path: Path, sig: signal.Signals) -> None:
    proc, (pid,) = _starter(SLEEPER, tmp_path / "sleep.log")
    try:
        assert _group_alive(pid)
        proc.send_signal(sig)
        proc.wait(30)
        until(lambda: not _group_alive(pid), f"the daemon's group to die after {sig.name}", 20)
    finally:
        if _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(10)


@pytest.mark.skipif(not rabbitmq_installed(), reason="rabbitmq-server not installed (make test installs it)")
def test_a_rabbitmq_node_and_its_epmd_die_when_the_test_process_is_killed(tmp_path: Path) -> None:
    proc, pids = _starter(NODE, tmp_path / "rabbit")
    try:
        assert all(_group_alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)  # no teardown, no atexit: only the guards remain
        proc.wait(30)
        until(lambda: not any(_group_alive(p) for p in pids), "the node's and epmd's groups to die", 30)
    finally:
        for p in pids:
            if _group_alive(p):
                os.killpg(p, signal.SIGKILL)
        proc.kill()
        proc.wait(10)
