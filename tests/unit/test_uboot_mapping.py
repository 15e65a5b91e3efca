"""BootState <-> U-Boot variables (hw/bootloader/uboot.py): the documented table,
lossless round trips for every state, and how environments written by RAUC or by
RAUC's stock boot script read."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hw.bootloader import model
from hw.bootloader.model import BootState, SlotBoot, SlotBootState
from hw.bootloader.uboot import UBootEnv, decode_state, encode_state
from hw.errors import BootEnvError

AB = ("A", "B")
GOOD = SlotBoot(SlotBootState.GOOD)
BAD = SlotBoot(SlotBootState.BAD)


def trial(n: int) -> SlotBoot:
    return SlotBoot(SlotBootState.TRIAL, n)


def test_mapping_table() -> None:
    state = BootState(("C", "B", "A"), {"A": GOOD, "B": BAD, "C": trial(10)}, last_good="A")
    assert encode_state(state) == {
        "BOOT_ORDER": "C B A",
        "BOOT_C_LEFT": "a",  # hex, as RAUC writes it
        "BOOT_B_LEFT": "0",
        "BOOT_A_LEFT": "3",
        "OTA_TRIAL": "C",
        "OTA_LAST_GOOD": "A",
    }


def test_no_trial_and_no_last_good_delete_their_variables() -> None:
    encoded = encode_state(BootState(AB, {"A": GOOD, "B": BAD}))
    assert (encoded["OTA_TRIAL"], encoded["OTA_LAST_GOOD"]) == (None, None)


def _states() -> st.SearchStrategy[BootState]:
    def build(names: list[str], kinds: list[tuple[str, int]], last: int | None) -> BootState:
        slots = {}
        for name, (kind, n) in zip(names, kinds, strict=False):
            slots[name] = GOOD if kind == "good" else BAD if kind == "bad" else trial(n)
        order = tuple(slots)
        return BootState(order, slots, order[last % len(order)] if last is not None else None)

    names = st.lists(st.sampled_from(["A", "B", "C", "system0", "rescue.1"]), min_size=1, max_size=4, unique=True)
    kinds = st.lists(st.tuples(st.sampled_from(["good", "bad", "trial"]), st.integers(0, 0xFFFF)), min_size=4,
                     max_size=4)
    return st.builds(build, names, kinds, st.none() | st.integers(0, 3))


@given(_states())
def test_every_state_round_trips(state: BootState) -> None:
    variables = {k: v for k, v in encode_state(state).items() if v is not None}
    assert decode_state(variables, sorted(state.slots)) == state


@given(_states(), st.sampled_from(["set_primary", "mark_good", "mark_bad", "choose"]))
def test_every_rule_application_round_trips(state: BootState, rule: str) -> None:
    name = state.order[-1]
    if rule == "set_primary":
        state = model.set_primary(state, name, 3)
    elif rule == "mark_good":
        state = model.mark_good(state, name)
    elif rule == "mark_bad":
        state = model.mark_bad(state, name)
    else:
        state = model.choose(state)[0]
    variables = {k: v for k, v in encode_state(state).items() if v is not None}
    assert decode_state(variables, state.order) == state


def test_env_of_rauc_s_stock_setup_reads_as_every_slot_committed() -> None:
    state = decode_state({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}, AB)
    assert state == BootState(AB, {"A": GOOD, "B": GOOD})


def test_stock_script_decrement_of_a_committed_slot_still_reads_good_and_store_restores_it() -> None:
    state = decode_state({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "1", "BOOT_B_LEFT": "2", "OTA_LAST_GOOD": "A"}, AB)
    assert state.slots == {"A": GOOD, "B": GOOD}
    assert (encode_state(state)["BOOT_A_LEFT"], encode_state(state)["BOOT_B_LEFT"]) == ("3", "3")


def test_slot_rauc_marked_bad_is_missing_from_boot_order_and_reads_bad_and_last() -> None:
    state = decode_state({"BOOT_ORDER": "B", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "3"}, AB)
    assert state == BootState(("B", "A"), {"A": BAD, "B": GOOD})
    assert encode_state(state)["BOOT_ORDER"] == "B A"  # written back in full: the position of BAD is kept


def test_exhausted_trial_and_bad_differ_only_by_ota_trial() -> None:
    base = {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0"}
    assert decode_state(base, AB).slots["B"] == BAD
    assert decode_state({**base, "OTA_TRIAL": "B"}, AB).slots["B"] == trial(0)


def test_unset_variables_read_as_the_boot_script_defaults() -> None:
    assert decode_state({}, AB) == BootState(AB, {"A": GOOD, "B": GOOD})
    assert decode_state({"BOOT_ORDER": "  "}, AB) == BootState(AB, {"A": GOOD, "B": GOOD})
    assert decode_state({"BOOT_ORDER": "B A", "OTA_TRIAL": "B"}, AB).slots["B"] == trial(3)


def test_counts_are_hex_with_or_without_0x() -> None:
    variables = {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "0x10", "BOOT_B_LEFT": "ff", "OTA_TRIAL": "A B"}
    assert decode_state(variables, AB).slots == {"A": trial(16), "B": trial(255)}


def test_repeated_name_in_boot_order_counts_once_where_it_first_appears() -> None:
    state = decode_state({"BOOT_ORDER": "B A B"}, AB)
    assert state.order == ("B", "A")


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"BOOT_ORDER": "A B R"}, "names unknown slot 'R'"),
        ({"BOOT_A_LEFT": "three"}, "BOOT_A_LEFT='three' is not a hex count"),
        ({"BOOT_A_LEFT": "-1"}, "is not a hex count"),
        ({"BOOT_A_LEFT": "123456789"}, "is not a hex count"),
        ({"OTA_TRIAL": "C"}, r"OTA_TRIAL='C' names unknown slots \['C'\]"),
        ({"OTA_LAST_GOOD": "Z"}, "OTA_LAST_GOOD='Z' is not a slot"),
    ],
)
def test_variables_the_agent_cannot_trust_are_errors(variables: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_state(variables, AB)


def test_unset_boot_order_with_other_bootnames_is_an_error() -> None:
    with pytest.raises(ValueError, match="BOOT_ORDER is not set and the default 'A B' does not name slots"):
        decode_state({}, ("system0", "system1"))


@pytest.mark.parametrize("bootnames", [(), ("A", "A"), ("A B",), ("-",), ("A=",), ("x" * 33,)])
def test_bootnames_that_cannot_be_variable_names_are_refused(bootnames: tuple[str, ...], tmp_path: Path) -> None:
    with pytest.raises(BootEnvError, match="bootname"):
        UBootEnv(tmp_path / "fw_env.config", bootnames)


def test_store_refuses_a_state_for_other_slots(tmp_path: Path) -> None:
    env = UBootEnv(tmp_path / "fw_env.config", AB)
    with pytest.raises(BootEnvError, match="state has slots"):
        env.store(BootState.initial(("A", "B", "C")))
