"""`make soak` (EDGE_OTA_SOAK=1; deselected otherwise, tests/reliability/conftest.py): random instants, seed
printed (EDGE_OTA_SOAK_SEED replays a run).

* **Random kills**: on one simulated device per backend, again and again, an
  install (of a release other than the running one) or a power-on with its
  boot-check runs as a real process and is SIGKILLed after a random delay
  within its measured duration (each kind's, re-measured whenever a run ends
  before its kill: `killed_mid_run` counts the kills that landed inside a
  run); then the device powers on and must settle on a good slot holding a
  known image, with status consistent with the slots
  (`Explorer.power_on_and_check`), and the next install (the next round) must
  work.
* **Random dropped-write states**: install, commit and rollback traced once per
  backend; random (cut, variant) states of those traces are put in place and
  checked like the exhaustive explorer does (acknowledged reports included).

Counts are at least EDGE_OTA_SOAK_KILLS / EDGE_OTA_SOAK_STATES (500 each).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import sim
from agent.daemon import build_device
from agent.status import status
from tests.powercut.conftest import Releases
from tests.powercut.explore import REPO
from tests.powercut.test_power_cut_states import BACKENDS, SCENARIOS, explorer_for
from tests.reliability.results import record

KILLS = int(os.environ.get("EDGE_OTA_SOAK_KILLS", "500"))
STATES = int(os.environ.get("EDGE_OTA_SOAK_STATES", "500"))


def _seed() -> int:
    seed = int(os.environ.get("EDGE_OTA_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"soak seed: {seed} (EDGE_OTA_SOAK_SEED={seed} replays it)", file=sys.stderr)
    return seed


def _run(argv: list[str], delay: float | None) -> int:
    return _timed(argv, delay)[0]


def _timed(argv: list[str], delay: float | None) -> tuple[int, float]:
    """Exit status (-9: killed after `delay`) and seconds taken."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=120)
    return rc, time.monotonic() - started


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_kill_instants_always_recover(tmp_path: Path, releases: Releases, backend: str) -> None:
    seed = _seed()
    rng = random.Random(f"{seed}:kills:{backend}")
    explorer = explorer_for(tmp_path, releases, SCENARIOS["install"], backend, installs=0)
    config = str(sim.config_path(explorer.dir))
    every = {r.image.version: r for r in (releases.v2, releases.v3, releases.v4)}
    versions = frozenset({"factory", *every})
    # how long each kind of run takes, re-measured whenever one ends before its kill (the
    # machine's load changes), so that the random instants fall inside the runs
    took = {"install": _timed(["-c", config, "install", str(releases.v2.bundle)], None)[1]}
    took["boot"] = _timed(["sim", "boot", str(explorer.dir)], None)[1]
    kills = max(1, -(-KILLS // len(BACKENDS)))  # rounded up: at least KILLS in all
    failures: list[str] = []
    killed = 0
    for n in range(kills):
        doc = status(build_device(sim.config_path(explorer.dir)))
        running = explorer.slot_content(doc.booted or "A")
        choices = [r for v, r in every.items() if r.image.security_version > doc.committed_security_version
                   and (running is None or v != running.version)]
        if not choices:  # the floor reached the newest release: a fresh device
            shutil.rmtree(tmp_path / "device")
            explorer = explorer_for(tmp_path, releases, SCENARIOS["install"], backend, installs=0)
            choices = list(every.values())
        release = rng.choice(choices)
        argv = ["-c", config, "install", str(release.bundle)]
        kind = "install" if rng.random() < 0.7 else "boot"
        delay = rng.uniform(0.0, took[kind])
        if kind == "install":
            rc, seconds = _timed(argv, delay)
        else:
            if _run(argv, None) != 0:
                failures.append(f"kill {n}: the install before the boot failed")
            rc, seconds = _timed(["sim", "boot", str(explorer.dir)], delay)
        if rc == 0:
            took[kind] = seconds
        if rc not in (0, -signal.SIGKILL):
            failures.append(f"kill {n}: the run itself failed (rc {rc}) after the previous kill")
        killed += rc == -signal.SIGKILL
        problems = explorer.power_on_and_check([], None, versions, ())
        failures += [f"kill {n} after {delay:.3f}s (rc {rc}): {p}" for p in problems]
    record("random kills", backend, passed=not failures, unrecovered=len(failures), kills=kills,
           killed_mid_run=killed, seed=seed)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_dropped_write_states_always_recover(tmp_path: Path, releases: Releases, backend: str) -> None:
    seed = _seed()
    rng = random.Random(f"{seed}:states:{backend}")
    per_flow = max(1, -(-STATES // (len(BACKENDS) * 3)))  # rounded up: at least STATES in all
    failures: list[str] = []
    checked = 0
    for name in ("install", "commit", "rollback"):
        explorer = explorer_for(tmp_path / name, releases, SCENARIOS[name], backend, installs=0)
        trace = explorer.trace(tmp_path / name / "trace")
        all_states = list(trace.states())
        for n in range(per_flow):
            state = rng.choice(all_states)
            found = explorer.check(trace, state, next_install=n % 10 == 9)
            checked += 1
            failures += [f"{name} cut {state.cut} ({state.variant}): {p}" for p in found]
    record("random dropped-write states", backend, passed=not failures, unrecovered=len(failures), states=checked,
           seed=seed)
    assert not failures, "\n".join(failures[:20])

