"""The BLS backend on a real directory: the agent's verbs through the `Bootloader`
facade (every store read back), systemd-boot's own power-on renames
(`simulate_boot`) agreeing with the shared model, and loud errors for every
layout systemd-boot would boot differently from what the model predicts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw.bootloader import model, open_env
from hw.bootloader.bls import LOADER_GUID, BlsEnv
from hw.bootloader.chooser import Bootloader
from hw.bootloader.model import BootState, SlotBoot, SlotBootState
from hw.errors import BootEnvError


def _env(esp: Path, bootnames: tuple[str, ...] = ("A", "B"), efivars: Path | None = None) -> BlsEnv:
    env = BlsEnv(esp, bootnames, efivars=efivars)
    env.create()
    return env


def _names(esp: Path) -> list[str]:
    return sorted(os.listdir(esp / "loader" / "entries"))


def _counted(state: BootState, booted: str) -> BootState:
    """systemd-boot counts every boot of a counted entry, a bad one booted because
    nothing else is bootable too: from then on it reads as a used-up trial."""
    if state.slots[booted].state is SlotBootState.BAD:
        return state.with_slot(booted, SlotBoot(SlotBootState.TRIAL, 0))
    return state


def test_create_writes_the_initial_state_as_one_good_entry_per_slot(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _names(tmp_path) == ["ota-1-B.conf", "ota-2-A.conf"]
    assert env.load() == BootState.initial(("A", "B"))
    text = (tmp_path / "loader" / "entries" / "ota-2-A.conf").read_text()
    assert "options root=PARTLABEL=rootfs-A ro ota.slot=A" in text
    assert "default ota-*" in (tmp_path / "loader" / "loader.conf").read_text()


def test_registry_opens_the_bls_backend(tmp_path: Path) -> None:
    _env(tmp_path)
    env = open_env("bls", tmp_path, ("A", "B"))
    assert env.name == "bls"
    assert env.load().order == ("A", "B")


def test_update_commit_cycle_through_the_facade(tmp_path: Path) -> None:
    env = _env(tmp_path)
    cmdline = tmp_path / "cmdline"
    boot = Bootloader(env, cmdline)

    boot.mark_bad("B")  # before the first byte is written to B
    assert _names(tmp_path) == ["ota-1-B+0.conf", "ota-2-A.conf"]
    boot.set_primary("B", 3)
    assert _names(tmp_path) == ["ota-2-A.conf", "ota-3-B+3.conf"]
    assert boot.primary_slot() == "B"

    decision = env.simulate_boot()
    assert (decision.slot, decision.trial) == ("B", True)
    assert _names(tmp_path) == ["ota-2-A.conf", "ota-3-B+2-1.conf"]
    cmdline.write_text("root=/dev/sda3 ro ota.slot=B\n")
    assert boot.booted_slot() == "B"

    boot.mark_good("B")  # what systemd-bless-boot does after boot-complete.target
    assert _names(tmp_path) == ["ota-2-A.conf", "ota-3-B.conf"]
    assert env.load() == BootState(
        order=("B", "A"), slots={"A": SlotBoot(SlotBootState.GOOD), "B": SlotBoot(SlotBootState.GOOD)}, last_good="B"
    )
    assert env.simulate_boot().slot == "B"
    assert _names(tmp_path) == ["ota-2-A.conf", "ota-3-B.conf"]  # a good entry is never renamed


def test_trial_that_never_commits_falls_back_after_its_tries(tmp_path: Path) -> None:
    env = _env(tmp_path)
    boot = Bootloader(env, tmp_path / "cmdline")
    boot.mark_bad("B")
    boot.set_primary("B", 2)
    assert [env.simulate_boot().slot for _ in range(4)] == ["B", "B", "A", "A"]
    assert _names(tmp_path) == ["ota-2-A.conf", "ota-3-B+0-2.conf"]
    state = env.load()
    assert state.slots["B"] == SlotBoot(SlotBootState.TRIAL, 0)  # used up, as the model has it
    assert state.last_good == "A"


def test_agent_marking_the_running_trial_bad_falls_back_at_once(tmp_path: Path) -> None:
    env = _env(tmp_path)
    boot = Bootloader(env, tmp_path / "cmdline")
    boot.mark_bad("B")
    boot.set_primary("B", 3)
    env.simulate_boot()
    boot.mark_bad("B")  # +0: bad, not a trial on its last try
    assert _names(tmp_path) == ["ota-2-A.conf", "ota-3-B+0.conf"]
    assert env.load().slots["B"].state is SlotBootState.BAD
    assert env.simulate_boot().slot == "A"


def test_every_slot_exhausted_boots_the_highest_priority_one_like_the_model(tmp_path: Path) -> None:
    env = _env(tmp_path)
    boot = Bootloader(env, tmp_path / "cmdline")
    boot.mark_bad("B")
    boot.mark_bad("A")
    state = env.load()
    assert state.last_good is None
    assert env.simulate_boot().slot == model.next_boot(state) == "A"
    assert _names(tmp_path) == ["ota-1-B+0.conf", "ota-2-A+0-1.conf"]  # systemd-boot still counts the attempt


@st.composite
def _flows(draw: st.DrawFn) -> tuple[tuple[str, ...], list[tuple[str, str, int]]]:
    slots = draw(st.sampled_from([("A", "B"), ("A", "B", "C")]))
    steps = draw(st.lists(
        st.tuples(st.sampled_from(["install", "boot", "commit", "reject"]), st.sampled_from(slots),
                  st.integers(1, 4)),
        max_size=25,
    ))
    return slots, steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flow=_flows())
def test_systemd_boot_renames_agree_with_the_model_for_any_agent_flow(
    tmp_path_factory: pytest.TempPathFactory, flow: tuple[tuple[str, ...], list[tuple[str, str, int]]]
) -> None:
    slots, steps = flow
    esp = tmp_path_factory.mktemp("esp")
    env = _env(esp, slots)
    boot = Bootloader(env, esp / "cmdline")
    expected = BootState.initial(slots)
    booted = slots[0]
    for verb, slot, tries in steps:
        if verb == "install" and slot != booted:
            boot.mark_bad(slot)
            boot.set_primary(slot, tries)
            expected = model.set_primary(model.mark_bad(expected, slot), slot, tries)
        elif verb == "boot":
            expected, want = model.choose(expected)
            got = env.simulate_boot()
            assert (got.slot, got.trial) == (want.slot, want.trial)
            booted = got.slot
            expected = _counted(expected, booted)
        elif verb == "commit":
            boot.mark_good(booted)
            expected = model.mark_good(expected, booted)
        elif verb == "reject":
            boot.mark_bad(booted)
            expected = model.mark_bad(expected, booted)
        assert env.load() == expected


def test_store_refuses_a_last_good_bls_cannot_express_and_renames_nothing(tmp_path: Path) -> None:
    env = _env(tmp_path)
    before = _names(tmp_path)
    state = BootState(order=("A", "B"), slots=env.load().slots, last_good="B")
    with pytest.raises(BootEnvError, match="cannot express last_good='B'"):
        env.store(state)
    assert _names(tmp_path) == before


def test_other_entries_on_the_esp_are_left_alone(tmp_path: Path) -> None:
    entries = tmp_path / "loader" / "entries"
    entries.mkdir(parents=True)
    (entries / "fedora-6.1.conf").write_text("title Fedora\nsort-key fedora\nlinux /vmlinuz\n")
    (tmp_path / "loader" / "loader.conf").write_text("timeout 5\ndefault fedora-*\n")
    env = _env(tmp_path)
    Bootloader(env, tmp_path / "cmdline").mark_bad("B")
    assert "fedora-6.1.conf" in _names(tmp_path)
    conf = (tmp_path / "loader" / "loader.conf").read_text()
    assert "timeout 5" in conf
    assert "default fedora-*" not in conf


ENTRY = "title x\nlinux /vmlinuz\noptions ota.slot={slot}\n"


@pytest.mark.parametrize(
    ("files", "loader_conf", "message"),
    [
        ({"ota-2-A.conf": ENTRY, "ota-1-B.conf": ENTRY}, None, "cannot read"),
        ({"ota-2-A.conf": ENTRY, "ota-1-B.conf": ENTRY}, "timeout 3\n", "must say 'default ota-\\*'"),
        ({"ota-2-A.conf": ENTRY, "ota-1-B.conf": ENTRY}, "default ota-2-a.conf\n", "must say 'default ota-\\*'"),
        ({"ota-2-A.conf": ENTRY}, "default ota-*\n", "no entry for slot"),
        ({"ota-2-A.conf": ENTRY, "ota-1-B.conf": ENTRY, "ota-3-B+1.conf": ENTRY}, "default ota-*\n",
         "two entries for slot B"),
        ({"ota-2-A.conf": ENTRY, "ota-2-B.conf": ENTRY}, "default ota-*\n", "share generation 2"),
        ({"ota-2-A.conf": ENTRY, "ota-1-B.conf": ENTRY, "ota-C.conf": ENTRY}, "default ota-*\n",
         "is not ota-<generation>-<slot>"),
        ({"ota-2-A.conf": ENTRY, "ota-1-B.conf": ENTRY, "ota-3-C.conf": ENTRY}, "default ota-*\n",
         "is for slot 'C'"),
        ({"ota-2-A.conf": "title x\nefi /x.efi\n", "ota-1-B.conf": ENTRY}, "default ota-*\n",
         "no 'linux' or 'uki' line"),
        ({"ota-2-A.conf": ENTRY + "sort-key a\n", "ota-1-B.conf": ENTRY}, "default ota-*\n", "sort-key"),
        ({"ota-2-A.conf": "linux /v\noptions ota.slot=B\n", "ota-1-B.conf": ENTRY}, "default ota-*\n",
         "boots with ota.slot=B"),
    ],
)
def test_layouts_systemd_boot_would_boot_differently_are_loud_errors(
    tmp_path: Path, files: dict[str, str], loader_conf: str | None, message: str
) -> None:
    entries = tmp_path / "loader" / "entries"
    entries.mkdir(parents=True)
    for name, text in files.items():
        slot = name.split("-")[2].split("+")[0].split(".")[0] if name.count("-") >= 2 else "A"
        (entries / name).write_text(text.format(slot=slot))
    if loader_conf is not None:
        (tmp_path / "loader" / "loader.conf").write_text(loader_conf)
    env = BlsEnv(tmp_path, ("A", "B"), efivars=None)
    with pytest.raises(BootEnvError, match=message) as info:
        env.load()
    assert str(info.value).startswith("bls backend (")


def test_missing_entries_directory_is_a_loud_error(tmp_path: Path) -> None:
    (tmp_path / "loader").mkdir()
    (tmp_path / "loader" / "loader.conf").write_text("default ota-*\n")
    with pytest.raises(BootEnvError, match="cannot list entries"):
        BlsEnv(tmp_path, ("A", "B"), efivars=None).load()


def _efivar(directory: Path, name: str, value: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{name}-{LOADER_GUID}").write_bytes(b"\x07\x00\x00\x00" + (value + "\0").encode("utf-16-le"))


def test_an_efi_default_naming_one_entry_defeats_fallback_and_is_refused(tmp_path: Path) -> None:
    efivars = tmp_path / "efivars"
    env = _env(tmp_path / "esp", efivars=efivars)
    _efivar(efivars, "LoaderEntryDefault", "ota-2-a.conf")
    with pytest.raises(BootEnvError, match=r"LoaderEntryDefault='ota-2-a\.conf'"):
        env.load()
    _efivar(efivars, "LoaderEntryDefault", "ota-*")
    assert env.load().order == ("A", "B")
    _efivar(efivars, "LoaderEntryOneShot", "ota-1-b.conf")
    with pytest.raises(BootEnvError, match="LoaderEntryOneShot"):
        env.load()


@pytest.mark.parametrize("bootnames", [("A", "a"), ("A", "B+1"), ("A", "")])
def test_bootnames_systemd_boot_cannot_tell_apart_are_refused(tmp_path: Path, bootnames: tuple[str, ...]) -> None:
    with pytest.raises(BootEnvError):
        BlsEnv(tmp_path, bootnames)
