"""Cross-check with systemd's `bootctl list`: for every state an agent flow goes
through, systemd's own parser sees our boot counters, orders our entries and
picks the default entry exactly as the BLS backend and the shared model say.
(bootctl shares systemd-boot's entry sorting and `default` matching.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hw.bootloader import model
from hw.bootloader.bls import BlsEnv, sd_boot_order
from hw.bootloader.chooser import Bootloader
from tests.component._bootctl import fetch, list_entries

BOOTCTL, WHY = fetch()
pytestmark = pytest.mark.skipif(BOOTCTL is None, reason=f"bootctl unavailable: {WHY}")


def _esp(tmp_path: Path, slots: tuple[str, ...]) -> BlsEnv:
    env = BlsEnv(tmp_path, slots, efivars=None)
    env.create()
    for s in slots:  # bootctl, like systemd-boot, wants the kernel the entry names
        (tmp_path / "ota" / s).mkdir(parents=True)
        (tmp_path / "ota" / s / "vmlinuz").write_bytes(b"kernel")
        (tmp_path / "ota" / s / "initrd.img").write_bytes(b"initrd")
    # Another OS's entry with a sort-key sorts before ours; `default ota-*` must still pick ours.
    (tmp_path / "loader" / "entries" / "other-1.0.conf").write_text(
        "title Other OS\nsort-key aaa\nversion 1.0\nlinux /ota/A/vmlinuz\n"
    )
    return env


def _check(env: BlsEnv) -> None:
    assert BOOTCTL is not None
    listed = list_entries(BOOTCTL, env.path)
    ours = [e for e in listed if e.id.startswith("ota-")]
    expected = sd_boot_order(env.entries())
    assert [e.id.lower() for e in ours] == [e.id for e in expected]
    for got, want in zip(ours, expected, strict=True):
        assert Path(got.source).name == want.name
        assert got.tries_left == want.tries_left
        assert (got.tries_done or 0) == want.tries_done
    defaults = [e.id for e in listed if e.default]
    assert len(defaults) == 1
    slot = model.next_boot(env.load())
    assert defaults[0].lower() == next(e.id for e in expected if e.slot == slot)


def test_bootctl_sees_the_update_cycle_as_the_model_does(tmp_path: Path) -> None:
    env = _esp(tmp_path, ("A", "B"))
    boot = Bootloader(env, tmp_path / "cmdline")
    _check(env)
    boot.mark_bad("B")
    _check(env)
    boot.set_primary("B", 3)
    _check(env)
    for _ in range(4):  # B +3 -> +2-1 -> +1-2 -> +0-3, then A
        env.simulate_boot()
        _check(env)
    boot.mark_bad("A")
    boot.set_primary("A", 2)
    env.simulate_boot()
    boot.mark_good("A")
    _check(env)


def test_bootctl_agrees_on_a_random_walk_over_three_slots(tmp_path: Path) -> None:
    slots = ("A", "B", "C")
    env = _esp(tmp_path, slots)
    boot = Bootloader(env, tmp_path / "cmdline")
    rng = random.Random(20240611)
    booted = "A"
    for _ in range(30):
        verb = rng.choice(["install", "boot", "boot", "commit", "reject"])
        if verb == "install":
            target = rng.choice([s for s in slots if s != booted])
            boot.mark_bad(target)
            boot.set_primary(target, rng.randint(1, 3))
        elif verb == "boot":
            booted = env.simulate_boot().slot
        elif verb == "commit":
            boot.mark_good(booted)
        else:
            boot.mark_bad(booted)
        _check(env)
