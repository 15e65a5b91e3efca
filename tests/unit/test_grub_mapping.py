"""The GRUB backend's mapping between BootState and grubenv variables (pure,
no tools): the documented table in both directions, round trips, RAUC's view
of the same variables, and the loud errors for states GRUB cannot hold."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw.bootloader import open_env
from hw.bootloader.grub import MAX_TRIES, GrubEnv, decode, encode, owned_vars
from hw.bootloader.grubenv import EnvBlock
from hw.bootloader.model import BootState, SlotBoot, SlotBootState, mark_bad, mark_good, set_primary
from hw.errors import BootEnvError

GOOD = SlotBoot(SlotBootState.GOOD)
BAD = SlotBoot(SlotBootState.BAD)


def trial(n: int) -> SlotBoot:
    return SlotBoot(SlotBootState.TRIAL, n)


def encoded(state: BootState) -> dict[str, str]:
    block = EnvBlock.fresh()
    encode(state, block)
    return block.as_dict()


def block_of(variables: dict[str, str]) -> EnvBlock:
    block = EnvBlock.fresh()
    for name, value in variables.items():
        block.set(name, value)
    return block


@pytest.mark.parametrize(
    ("slot", "expected"),
    [
        (GOOD, {"B_OK": "1", "B_TRY": "0"}),
        (trial(3), {"B_OK": "1", "B_TRY": "0", "OTA_B_LEFT": "3"}),
        (trial(1), {"B_OK": "1", "B_TRY": "0", "OTA_B_LEFT": "1"}),
        (trial(0), {"B_OK": "1", "B_TRY": "1", "OTA_B_LEFT": "0"}),
        (BAD, {"B_OK": "0", "B_TRY": "0"}),
    ],
    ids=["good", "trial-3", "trial-1", "trial-used-up", "bad"],
)
def test_each_slot_state_maps_to_the_documented_variables_and_back(slot: SlotBoot, expected: dict[str, str]) -> None:
    state = BootState(order=("B", "A"), slots={"A": GOOD, "B": slot}, last_good="A")
    variables = encoded(state)
    assert {k: v for k, v in variables.items() if k.startswith(("B_", "OTA_B_"))} == expected
    assert variables["ORDER"] == "B A"
    assert variables["OTA_LAST_GOOD"] == "A"
    assert decode(block_of(variables), ("A", "B")) == state


def test_no_last_good_leaves_the_variable_unset() -> None:
    state = BootState(order=("A", "B"), slots={"A": BAD, "B": trial(2)}, last_good=None)
    assert "OTA_LAST_GOOD" not in encoded(state)
    assert decode(block_of(encoded(state)), ("A", "B")).last_good is None


slot_boots = st.one_of(st.just(GOOD), st.just(BAD), st.integers(0, MAX_TRIES).map(trial))


@st.composite
def boot_states(draw: st.DrawFn) -> BootState:
    names = draw(st.sampled_from([("A", "B"), ("A", "B", "C"), ("system0", "system1")]))
    order = tuple(draw(st.permutations(names)))
    slots = {n: draw(slot_boots) for n in names}
    last_good = draw(st.one_of(st.none(), st.sampled_from(names)))
    return BootState(order=order, slots=slots, last_good=last_good)


@settings(max_examples=300)
@given(boot_states())
def test_every_state_round_trips_through_the_variables(state: BootState) -> None:
    block = EnvBlock.fresh()
    block.set("saved_entry", "keep me")
    encode(state, block)
    assert decode(block, tuple(sorted(state.slots))) == state
    assert block.get("saved_entry") == "keep me"
    assert set(block.as_dict()) <= {*owned_vars(tuple(state.slots)), "saved_entry"}


@settings(max_examples=300)
@given(boot_states())
def test_rauc_reads_exactly_good_and_pending_trials_as_good(state: BootState) -> None:
    # RAUC's grub backend: good iff the slot is in ORDER with _OK=1 and _TRY=0;
    # its stock script boots exactly those slots.
    variables = encoded(state)
    for name, slot in state.slots.items():
        rauc_good = (
            name in variables["ORDER"].split() and variables[f"{name}_OK"] == "1" and variables[f"{name}_TRY"] == "0"
        )
        assert rauc_good == slot.bootable


def test_env_written_by_rauc_alone_is_read_as_committed_slots() -> None:
    rauc = block_of({"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"})
    assert decode(rauc, ("A", "B")) == BootState(order=("B", "A"), slots={"A": GOOD, "B": GOOD}, last_good=None)


def test_slot_booted_by_raucs_stock_script_reads_as_used_up_trial() -> None:
    # RAUC's script sets TRY=1 on the slot it boots; until mark-good, GRUB will not pick it again.
    block = block_of({"ORDER": "A B", "A_OK": "1", "A_TRY": "1", "B_OK": "0", "B_TRY": "0", "OTA_LAST_GOOD": "A"})
    state = decode(block, ("A", "B"))
    assert state.slots == {"A": trial(0), "B": BAD}
    assert mark_good(state, "A").slots["A"] == GOOD


def test_bad_flag_wins_over_a_leftover_count() -> None:
    block = block_of({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "1", "OTA_B_LEFT": "4"})
    assert decode(block, ("A", "B")).slots["B"] == BAD


def test_slot_missing_from_order_is_bad_and_goes_last() -> None:
    block = block_of({"ORDER": "B", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"})
    state = decode(block, ("A", "B"))
    assert state.order == ("B", "A")
    assert state.slots["A"] == BAD


def test_empty_count_reads_as_unset() -> None:
    block = block_of({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "OTA_A_LEFT": "", "B_OK": "1", "B_TRY": "0"})
    assert decode(block, ("A", "B")).slots["A"] == GOOD


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"}, "ORDER is not set"),
        ({"ORDER": " ", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"}, "ORDER is not set or empty"),
        ({"ORDER": "A R", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"}, "unknown slots ['R']"),
        ({"ORDER": "A A B", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"}, "lists a slot twice"),
        ({"ORDER": "A B", "A_OK": "1", "B_OK": "1", "B_TRY": "0"}, "A_TRY is not set"),
        ({"ORDER": "A B", "A_OK": "yes", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"}, "A_OK='yes', expected 0 or 1"),
        ({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "OTA_A_LEFT": "12", "B_OK": "1", "B_TRY": "0"}, "0..9"),
        ({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0", "OTA_LAST_GOOD": "C"}, "not one of"),
    ],
    ids=["no-order", "empty-order", "unknown-slot", "duplicate", "missing-try", "bad-flag", "big-count", "last-good"],
)
def test_inconsistent_variables_are_a_loud_error(variables: dict[str, str], message: str) -> None:
    with pytest.raises(BootEnvError, match=r"^grub backend") as err:
        decode(block_of(variables), ("A", "B"))
    assert message in str(err.value)


def test_more_tries_than_the_script_can_count_are_refused(tmp_path: Path) -> None:
    env = GrubEnv(tmp_path / "grubenv", ("A", "B"))
    env.create()
    before = env.path.read_bytes()
    with pytest.raises(BootEnvError, match=f"0..{MAX_TRIES}"):
        env.store(set_primary(env.load(), "B", MAX_TRIES + 1))
    assert env.path.read_bytes() == before
    env.store(set_primary(env.load(), "B", MAX_TRIES))
    assert env.load().slots["B"] == trial(MAX_TRIES)


@pytest.mark.parametrize("names", [(), ("A", "A"), ("A", "B-1"), ("A", "slot b")])
def test_bootnames_that_cannot_be_grub_variables_are_refused(tmp_path: Path, names: tuple[str, ...]) -> None:
    with pytest.raises(BootEnvError):
        GrubEnv(tmp_path / "grubenv", names)


def test_registry_opens_the_grub_backend_and_the_agent_verbs_persist(tmp_path: Path) -> None:
    env = open_env("grub", tmp_path / "grubenv", ("A", "B"))
    assert isinstance(env, GrubEnv)
    env.create()
    assert env.load() == BootState.initial(("A", "B"))
    env.store(set_primary(env.load(), "B", 3))
    env.store(mark_good(env.load(), "B"))
    env.store(mark_bad(env.load(), "A"))
    assert env.load() == BootState(order=("B", "A"), slots={"A": BAD, "B": GOOD}, last_good="B")


def test_state_for_other_slots_is_refused(tmp_path: Path) -> None:
    env = GrubEnv(tmp_path / "grubenv", ("A", "B"))
    env.create()
    with pytest.raises(BootEnvError, match="config has"):
        env.store(BootState.initial(("A", "B", "C")))


def test_missing_file_is_a_loud_error_naming_it(tmp_path: Path) -> None:
    env = GrubEnv(tmp_path / "nope" / "grubenv", ("A", "B"))
    with pytest.raises(BootEnvError, match="cannot read") as err:
        env.load()
    assert err.value.path == str(env.path)
    with pytest.raises(BootEnvError, match="cannot read"):
        env.store(BootState.initial(("A", "B")))
