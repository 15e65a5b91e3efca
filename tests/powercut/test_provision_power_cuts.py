"""Every on-disk state a power cut can leave during `ota-agent provision` (unsynced
writes dropped, kept or torn: `tests.powercut.replay`), on the simulated
bootloader and on U-Boot: in no state may the bootloader boot a slot that holds
part of the image (a bootable slot is either untouched or holds the whole image),
and from a sample of the states, spread over the whole run, provisioning again
completes: the image in both slots, every slot good with A primary, the record
complete, and the key that survived the cut (if one did) kept."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main as agent_main
from agent.daemon import build_device
from hw.bootloader import model
from tests.fixtures.factory import blank_device
from tests.powercut.conftest import COMPATIBLE, SLOT_SIZE, Releases
from tests.powercut.explore import REPO, RESULTS, Explorer, Result, Scenario
from tests.powercut.replay import Baseline, State, Trace

RERUNS = 8  # provisioning re-runs per backend, spread over the distinct states


def _sha(path: Path, length: int) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def _bootable_slots_hold_whole_images(d: Path, config: Path, image_sha: str, size: int) -> list[str]:
    try:
        state = build_device(config).bootloader.env.load()
    except Exception:  # no state yet, or a torn one the next run replaces: nothing boots from it
        return []
    blank = hashlib.sha256(bytes(size)).hexdigest()
    problems = []
    for b in ("A", "B"):
        if state.slots[b].bootable and _sha(d / f"slot-{b}.img", size) not in (blank, image_sha):
            problems.append(f"slot {b} is bootable ({state.slots[b].describe()}) with part of the image")
    return problems


@pytest.mark.parametrize("backend", ["sim", "uboot"])
def test_every_power_cut_during_provisioning_leaves_no_bootable_partial_slot_and_resumes(
    tmp_path: Path, releases: Releases, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    d = tmp_path / "device"
    config = blank_device(d, backend=backend, keyring=releases.keyring, compatible=COMPATIBLE, slot_size=SLOT_SIZE,
                          broker="mqtt://127.0.0.1:1883")
    bundle = releases.v2.bundle
    image = releases.v2.image
    argv = ("-c", str(config), "provision", "--bundle", str(bundle), "--device-id", "pc-1")
    baseline = Baseline.take(d)
    log_dir = tmp_path / "trace"
    cmd = [sys.executable, "-m", "tests.powercut.traced_agent", "--root", str(d), "--log", str(log_dir), "--", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    trace = Trace.load(baseline, log_dir)
    assert not trace.unsupported()
    explorer = Explorer(d, Scenario("provision", argv, (), frozenset()), backend, {},
                        (releases.v4.bundle, releases.v4.image))
    result = Result("provision", backend, ops=trace.fs_ops)
    distinct: dict[str, State] = {}
    for state in trace.states():
        result.explored += 1
        distinct.setdefault(trace.tree_hash(state), state)
    result.distinct = len(distinct)
    states = sorted(distinct.values(), key=lambda s: (s.cut, s.variant))
    every = max(1, len(states) // RERUNS)
    for n, state in enumerate(states):
        where = f"cut before op {state.cut} ({state.variant})"
        explorer.materialize(trace, state)
        result.failures += [f"{where}: {p}" for p in _bootable_slots_hold_whole_images(d, config, image.sha256,
                                                                                       image.size)]
        if n % every == every - 1 or n == len(states) - 1:
            result.installs += 1
            result.failures += [f"{where}: {p}" for p in _rerun(d, config, argv, image.sha256, image.size, capsys)]
    result.seconds = time.monotonic() - started
    RESULTS.append(result)
    assert result.distinct > 10
    assert not result.failures, f"{len(result.failures)} failing states:\n" + "\n".join(result.failures[:25])


def _rerun(d: Path, config: Path, argv: tuple[str, ...], image_sha: str, size: int,
           capsys: pytest.CaptureFixture[str]) -> list[str]:
    key = d / "provision" / "key.pem"
    key_before = key.read_bytes() if key.exists() else None
    capsys.readouterr()
    rec = d / "provision" / "record.json"
    pinned = rec.exists() and '"device_id": "pc-1"' in rec.read_text()
    # Once the id is recorded the re-run need not repeat it; before that (the cut came
    # before the first record was durable, so no key exists either) the operator repeats it.
    rc = agent_main([*(argv[:-2] if pinned else argv), "--json"])
    out: Any = capsys.readouterr()
    if rc != 0 and "already provisioned" not in out.err:
        return [f"provisioning again failed: {out.err.strip()[:300]}"]
    problems = []
    if key_before is not None and key.read_bytes() != key_before:
        problems.append("the surviving key was replaced")
    for b in ("A", "B"):
        if _sha(d / f"slot-{b}.img", size) != image_sha:
            problems.append(f"slot {b} does not hold the image after provisioning again")
    if build_device(config).bootloader.state() != model.BootState.initial(("A", "B")):
        problems.append("the bootloader is not in its initial state after provisioning again")
    if '"device_id": "pc-1"' not in (d / "provision" / "record.json").read_text():
        problems.append("the record lost the device id")
    return problems
