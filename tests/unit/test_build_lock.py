"""The host-wide build lock (tests.vm.paths.exclusive) that lets the suite's
worker processes share the checkout and the VM cache: a second holder waits
until the first leaves its block, another resource does not wait, and a holder
killed inside its block frees the lock. Each with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.paths import TOP, lock_file

HOLD = """
import sys, time
from pathlib import Path
from tests.vm.paths import exclusive
resource, log, hold = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
with exclusive(resource):
    with log.open("a") as f:
        f.write(f"in {time.monotonic()}\\n")
    time.sleep(hold)
    with log.open("a") as f:
        f.write(f"out {time.monotonic()}\\n")
"""


@pytest.fixture
def fresh() -> Iterator[Callable[[], str]]:
    """A resource name no other run uses; its lock file is removed afterwards."""
    names: list[str] = []

    def make() -> str:
        names.append(f"test-{uuid.uuid4().hex}")
        return names[-1]

    yield make
    for name in names:
        lock_file(name).unlink(missing_ok=True)


def holder(resource: str, log: Path, hold: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", HOLD, resource, str(log), str(hold)], cwd=TOP)


def entered(log: Path) -> list[tuple[str, float]]:
    if not log.exists():
        return []
    return [(word, float(t)) for word, t in (line.split() for line in log.read_text().splitlines())]


def wait_entered(log: Path, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for word, _ in entered(log) if word == "in") < count:
        assert time.monotonic() < deadline, f"{count} holder(s) never entered: {entered(log)}"
        time.sleep(0.02)


def test_a_second_holder_of_the_same_resource_waits_until_the_first_leaves(
    tmp_path: Path, fresh: Callable[[], str]
) -> None:
    resource = fresh()
    log = tmp_path / "log"
    first = holder(resource, log, 1.0)
    wait_entered(log, 1)
    second = holder(resource, log, 0.0)
    assert first.wait(30) == 0
    assert second.wait(30) == 0
    events = entered(log)
    assert [word for word, _ in events] == ["in", "out", "in", "out"], events
    assert events[2][1] >= events[1][1]


def test_another_resource_does_not_wait(tmp_path: Path, fresh: Callable[[], str]) -> None:
    log_a, log_b = tmp_path / "a", tmp_path / "b"
    first = holder(fresh(), log_a, 5.0)
    try:
        wait_entered(log_a, 1)
        other = holder(fresh(), log_b, 0.0)
        assert other.wait(30) == 0
        assert [word for word, _ in entered(log_a)] == ["in"], "the first holder had left already"
        assert [word for word, _ in entered(log_b)] == ["in", "out"]
    finally:
        first.kill()
        first.wait()


def test_a_holder_killed_inside_its_block_frees_the_lock(tmp_path: Path, fresh: Callable[[], str]) -> None:
    resource = fresh()
    log = tmp_path / "log"
    first = holder(resource, log, 60.0)
    wait_entered(log, 1)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    second = holder(resource, log, 0.0)
    assert second.wait(30) == 0
    assert [word for word, _ in entered(log)] == ["in", "in", "out"]
