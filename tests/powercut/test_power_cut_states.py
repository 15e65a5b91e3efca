"""Every on-disk state a power cut can leave during install, commit, rollback (a
failed health check, and a trial that used up its tries) and replacing a pending
update, on every bootloader backend, with unsynced writes
dropped (or kept, or torn): the device boots a good slot, its records and reports
tell the truth, and the next install works (`tests.powercut.explore`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from agent import sim
from agent.bootcheck import HealthOverride
from agent.daemon import build_device
from agent.installer import install
from agent.sources import source_for
from hw.bootloader import model
from ota_common.fsutil import atomic_write
from tests.powercut.conftest import COMPATIBLE, SLOT_SIZE, Releases
from tests.powercut.explore import RESULTS, Explorer, Scenario

BACKENDS = ["sim", "uboot", "grub", "bls"]
SCENARIOS = {
    "install": Scenario("install", ("install", "{v2}"), ("A",), frozenset({"factory", "2.0"}), pending=False),
    "commit": Scenario("commit", ("sim", "boot", "{dir}"), ("A", "B"), frozenset({"2.0"})),
    "rollback": Scenario(
        "rollback", ("sim", "boot", "{dir}", "--health", "fail"), ("A", "B"), frozenset({"factory"}),
        health=HealthOverride.FAIL, rollback="failed its health checks: health checks forced to fail",
    ),
    # B used its only try without boot-check running: the firmware falls back to A
    # (BLS stores a used-up trial as bad, so the reason names both possibilities).
    "fallback": Scenario(
        "fallback", ("sim", "boot", "{dir}"), ("A", "B"), frozenset({"factory"}),
        rollback="did not commit", tries=1, pre_boots=1,
    ),
    "replace-pending": Scenario("replace-pending", ("install", "{v3}"), ("A",), frozenset({"factory", "2.0", "3.0"})),
    # A delta read from the booted slot A (the factory image) while B is written.
    "install-delta": Scenario("install-delta", ("install", "{delta}"), ("A",), frozenset({"factory", "2.1"}),
                              pending=False),
}


def new_device(directory: Path, releases: Releases, backend: str, tries: int) -> None:
    spec = sim.SimSpec(directory=directory, image=releases.factory.path, keyring=releases.keyring,
                       compatible=COMPATIBLE, bootloader=backend, slot_size=SLOT_SIZE, tries=tries)
    sim.init(spec)


def power_on_without_boot_check(directory: Path) -> None:
    """The firmware's half of a power-on (count, pick, pass the slot on the command
    line); the device dies before boot-check runs."""
    device = build_device(sim.config_path(directory))
    state, decision = model.choose(device.bootloader.env.load())
    device.bootloader.env.store(state)
    atomic_write(device.config.cmdline, f"ota.slot={decision.slot} rauc.slot={decision.slot}\n".encode())


def install_bundle(directory: Path, bundle: Path) -> None:
    with source_for(str(bundle)).open() as stream:
        install(build_device(sim.config_path(directory)), stream)


def explorer_for(
    tmp_path: Path,
    releases: Releases,
    scenario: Scenario,
    backend: str,
    *,
    installs: int = 3,
    tracer_args: tuple[str, ...] = (),
) -> Explorer:
    """A fresh device on `backend` made ready for `scenario` (the pending update
    installed where the scenario needs one), with its explorer."""
    directory = tmp_path / "device"
    new_device(directory, releases, backend, scenario.tries)
    if scenario.pending:
        install_bundle(directory, releases.v2.bundle)  # installed, not booted yet
    for _ in range(scenario.pre_boots):
        power_on_without_boot_check(directory)
    argv = tuple(a.format(v2=releases.v2.bundle, v3=releases.v3.bundle, delta=releases.delta.bundle, dir="{dir}")
                 for a in scenario.argv)
    concrete = dataclasses.replace(scenario, argv=argv)
    fresh = (releases.v4.bundle, releases.v4.image)
    return Explorer(directory, concrete, backend, releases.images, fresh, installs=installs, tracer_args=tracer_args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_power_cut_state_boots_a_good_slot_and_tells_the_truth(
    tmp_path: Path, releases: Releases, name: str, backend: str
) -> None:
    started = time.monotonic()
    explorer = explorer_for(tmp_path, releases, SCENARIOS[name], backend)
    result = explorer.explore(explorer.trace(tmp_path / "trace"))
    result.seconds = time.monotonic() - started
    RESULTS.append(result)
    assert result.distinct > 1
    assert not result.failures, f"{len(result.failures)} failing states:\n" + "\n".join(result.failures[:25])
