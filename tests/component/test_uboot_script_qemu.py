"""The shipped U-Boot boot script (hw/scripts/boot.cmd -> boot.scr, built by its
Makefile) in the real U-Boot 2023.01 hush interpreter under QEMU, against
environments our UBootEnv writes.

Every boot is checked three ways: the slot U-Boot announced on the serial
console (and handed to the slot's boot command in bootargs) is the one
`model.choose` picks for the state our reader saw before the boot; the env U-Boot
saved is exactly the state `model.choose` says it saves, read with our reader;
and fw_printenv reads every variable of it the same as our reader does. See
tests/component/_uboot.py for the machine (about 1 s per boot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hw.bootloader import model
from hw.bootloader.chooser import Bootloader
from hw.bootloader.model import BootState, SlotBoot, SlotBootState
from hw.bootloader.uboot import UBootEnv
from hw.bootloader.uboot_env import UBootEnvStore
from tests.component._uboot import (
    BOOTNAMES,
    RAW_ENV_OFFSETS,
    RAW_ENV_SIZE,
    Boot,
    UBootMachine,
    build_boot_scr,
    firmware,
    fw_printenv,
    fw_setenv,
    golden_image,
    needs_qemu_uboot,
)

pytestmark = [pytest.mark.slow, needs_qemu_uboot]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    spl = firmware()
    boot_scr = build_boot_scr()
    return golden_image(tmp_path_factory.mktemp("uboot-golden"), spl), spl, boot_scr


@pytest.fixture
def machine(rig: tuple[Path, Path, Path], tmp_path: Path) -> UBootMachine:
    golden, spl, boot_scr = rig
    return UBootMachine(tmp_path, golden, spl, boot_scr)


@pytest.fixture
def redundant_machine(rig: tuple[Path, Path, Path], tmp_path: Path) -> UBootMachine:
    golden, spl, boot_scr = rig
    m = UBootMachine(tmp_path, golden, spl, boot_scr, redundant=True)
    m.init_env(m.board)  # copy 1 of 2, flags 1: the board's env before edge-ota
    m.env.create()  # our variables, written to the other copy
    return m


def boot_as_the_model_says(m: UBootMachine, *, saves_defaults: bool = False) -> Boot:
    before = m.env.load()
    expected, decision = model.choose(before)
    raw_before = m.fat_env.read_bytes()
    boot = m.boot()
    assert boot.slot == decision.slot, boot.log[-2000:]
    assert boot.kernel_slot == decision.slot
    assert {f"ota.slot={decision.slot}", f"rauc.slot={decision.slot}"} <= set(boot.bootargs.split())
    assert ("trial" in boot.reason) == decision.trial
    assert m.env.load() == expected
    assert fw_printenv(m.config) == m.env.variables()
    if saves_defaults:
        assert m.fat_env.read_bytes() != raw_before, "the defaults were not saved"
    elif not decision.trial:
        assert m.fat_env.read_bytes() == raw_before, "a boot without a trial must not write the env"
    return boot


def commit_from_booted_slot(m: UBootMachine, boot: Boot, tmp_path: Path) -> str:
    """The agent's side after a boot: booted slot from the kernel command line, mark good."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(boot.bootargs + "\n")
    bootloader = Bootloader(m.env, cmdline)
    booted = bootloader.booted_slot()
    bootloader.mark_good(booted)
    return booted


def test_trial_that_commits_keeps_booting_the_new_slot_without_counting(machine: UBootMachine, tmp_path: Path) -> None:
    machine.env.create()
    machine.env.store(model.set_primary(machine.env.load(), "B", 3))
    first = boot_as_the_model_says(machine)
    assert first.slot == "B"
    assert machine.env.load().slots["B"] == SlotBoot(SlotBootState.TRIAL, 2)
    assert commit_from_booted_slot(machine, first, tmp_path) == "B"
    committed = machine.env.variables()
    assert (committed["BOOT_B_LEFT"], committed["OTA_LAST_GOOD"], "OTA_TRIAL" in committed) == ("3", "B", False)
    for _ in range(2):
        assert boot_as_the_model_says(machine).slot == "B"
    assert machine.env.variables() == committed


def test_trial_that_never_commits_falls_back_after_its_tries(machine: UBootMachine) -> None:
    machine.env.create()
    machine.env.store(model.set_primary(machine.env.load(), "B", 3))
    slots = [boot_as_the_model_says(machine).slot for _ in range(5)]
    assert slots == ["B", "B", "B", "A", "A"]
    state = machine.env.load()
    assert state.slots["B"] == SlotBoot(SlotBootState.TRIAL, 0)
    assert state.slots["A"].state is SlotBootState.GOOD


def test_power_cuts_on_a_committed_system_never_switch_slots(machine: UBootMachine) -> None:
    machine.env.create()
    machine.env.store(model.mark_good(model.set_primary(machine.env.load(), "B", 3), "B"))
    full = boot_as_the_model_says(machine)
    assert full.slot == "B"
    committed_bytes = machine.fat_env.read_bytes()
    committed_state = machine.env.load()
    # 10 cuts: four at fractions of a whole boot, six the moment the console shows a phase
    # (SPL, env load, script start, the script's choice, the kernel hand-off, its return).
    phases = ["Trying to boot from MMC1", "Loading Environment from FAT", "## Executing script",
              "edge-ota: booting slot", "OTA-KERNEL", "did not boot; resetting"]
    cuts: list[dict[str, Any]] = [{"cut_after": full.seconds * f} for f in (0.1, 0.3, 0.5, 0.7)]
    cuts += [{"cut_at": p} for p in phases]
    for cut in cuts:
        power = machine.boot(**cut)
        assert cut.get("cut_at", "") in power.log
        assert machine.fat_env.read_bytes() == committed_bytes, f"cut {cut} changed the env"
        assert machine.env.load() == committed_state
        assert power.slot in (None, "B")
    assert boot_as_the_model_says(machine).slot == "B"


def test_all_counters_at_zero_boots_the_last_good_slot(machine: UBootMachine) -> None:
    # The field state of home-assistant/operating-system#4886, as a RAUC-era device has it.
    machine.env.create()
    for name, value in [("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "0"),
                        ("OTA_TRIAL", "B"), ("OTA_LAST_GOOD", "A")]:
        fw_setenv(machine.config, name, value)
    state = machine.env.load()
    assert not any(s.bootable for s in state.slots.values())
    for _ in range(2):  # boots A, again and again, without resetting any counter
        boot = boot_as_the_model_says(machine)
        assert (boot.slot, boot.reason) == ("A", "no bootable slot in BOOT_ORDER, last committed slot")
    assert machine.env.load() == state


def test_env_without_slot_variables_boots_a_and_saves_the_defaults(machine: UBootMachine) -> None:
    assert "BOOT_ORDER" not in machine.env.variables()  # only the board's own variables so far
    assert boot_as_the_model_says(machine, saves_defaults=True).slot == "A"
    saved = machine.env.variables()
    assert (saved["BOOT_ORDER"], saved["BOOT_A_LEFT"], saved["BOOT_B_LEFT"]) == ("A B", "3", "3")
    assert machine.env.load() == BootState(("A", "B"), {b: SlotBoot(SlotBootState.GOOD) for b in BOOTNAMES})


def test_any_bootnames_and_three_slots(rig: tuple[Path, Path, Path], tmp_path: Path) -> None:
    m = UBootMachine(tmp_path, *rig, bootnames=("sys.a", "sys-b", "rescue_1"))
    m.env.create()
    m.env.store(model.set_primary(model.mark_bad(m.env.load(), "sys-b"), "sys-b", 2))
    m.env.store(model.mark_bad(m.env.load(), "sys.a"))
    slots = [boot_as_the_model_says(m).slot for _ in range(3)]
    assert slots == ["sys-b", "sys-b", "rescue_1"]


def _tear(image: Path, offset: int, old: bytes, keep_new: int) -> None:
    """Power cut inside a copy's write: the first ``keep_new`` bytes are new, the rest old."""
    with image.open("r+b") as f:
        f.seek(offset + keep_new)
        f.write(old[keep_new:])


def _raw_copy(image: Path, index: int) -> bytes:
    with image.open("rb") as f:
        f.seek(RAW_ENV_OFFSETS[index])
        return f.read(RAW_ENV_SIZE)


def test_redundant_env_with_a_torn_newer_copy_boots_from_the_older(redundant_machine: UBootMachine) -> None:
    m = redundant_machine
    committed = m.env.load()
    store = UBootEnvStore(m.config)
    target = 1 - store.read().current
    old = _raw_copy(m.image, target)
    m.env.store(model.set_primary(committed, "B", 3))  # the agent's write, cut inside the variables:
    new = _raw_copy(m.image, target)
    _tear(m.image, RAW_ENV_OFFSETS[target], old, 64)
    assert _raw_copy(m.image, target) not in (old, new)
    assert m.env.load() == committed
    assert fw_printenv(m.config) == m.env.variables()
    boot = m.boot()
    assert boot.env_copy == store.read().current == 1 - target
    assert (boot.slot, boot.kernel_slot) == ("A", "A")
    assert m.fat_env.read_bytes() == m.board_blob  # a committed boot: U-Boot saved nothing


def test_redundant_env_with_a_corrupt_older_copy_boots_the_trial(redundant_machine: UBootMachine) -> None:
    m = redundant_machine
    m.env.store(model.set_primary(m.env.load(), "B", 3))
    trial = m.env.load()
    newer = UBootEnvStore(m.config).read().current
    with m.image.open("r+b") as f:  # bit rot in the copy that is not current
        f.seek(RAW_ENV_OFFSETS[1 - newer] + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    assert m.env.load() == trial
    expected, decision = model.choose(trial)
    boot = m.boot()
    assert boot.env_copy == newer
    assert (boot.slot, boot.kernel_slot) == (decision.slot, decision.slot) == ("B", "B")
    saved = UBootEnv(m.fat_config, BOOTNAMES)  # U-Boot's saveenv went to this board's FAT env
    assert saved.load() == expected
    assert fw_printenv(m.fat_config) == saved.variables()
