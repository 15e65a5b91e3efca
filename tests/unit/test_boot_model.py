"""The boot-counting rules every backend and boot script implements."""

from __future__ import annotations

import pytest

from hw.bootloader import model
from hw.bootloader.model import BootState, SlotBoot, SlotBootState

GOOD = SlotBoot(SlotBootState.GOOD)
BAD = SlotBoot(SlotBootState.BAD)


def trial(n: int) -> SlotBoot:
    return SlotBoot(SlotBootState.TRIAL, n)


def test_committed_slot_boots_without_touching_any_counter() -> None:
    state = BootState.initial(("A", "B"))
    new, decision = model.choose(state)
    assert decision.slot == "A"
    assert not decision.trial
    assert new == state


def test_repeated_power_cuts_never_erode_a_committed_slot() -> None:
    state = BootState.initial(("A", "B"))
    for _ in range(100):
        state, decision = model.choose(state)
        assert decision.slot == "A"
    assert state.slots["A"] == GOOD


def test_trial_counts_down_then_falls_back_to_the_committed_slot() -> None:
    state = model.set_primary(BootState.initial(("A", "B")), "B", 3)
    assert state.order == ("B", "A")
    chosen = []
    for _ in range(5):
        state, decision = model.choose(state)
        chosen.append(decision.slot)
    assert chosen == ["B", "B", "B", "A", "A"]
    assert state.slots["B"] == trial(0)


def test_commit_keeps_the_new_slot_and_records_it_as_last_good() -> None:
    state = model.set_primary(BootState.initial(("A", "B")), "B", 3)
    state, _ = model.choose(state)
    state = model.mark_good(state, "B")
    assert state.last_good == "B"
    assert [model.choose(state)[1].slot for _ in range(3)] == ["B", "B", "B"]


def test_every_slot_unbootable_boots_the_last_committed_slot_instead_of_looping() -> None:
    state = BootState(("A", "B"), {"A": trial(0), "B": trial(0)}, last_good="B")
    new, decision = model.choose(state)
    assert decision.slot == "B"
    assert "last committed" in decision.reason
    assert new == state


def test_marking_the_last_good_slot_bad_moves_last_good_to_another_good_slot() -> None:
    state = model.mark_bad(BootState.initial(("A", "B")), "A")
    assert state.slots["A"] == BAD
    assert state.last_good == "B"
    assert model.next_boot(state) == "B"


def test_set_primary_rejects_zero_tries_and_unknown_slots() -> None:
    state = BootState.initial(("A", "B"))
    with pytest.raises(ValueError, match="tries"):
        model.set_primary(state, "B", 0)
    with pytest.raises(KeyError, match="unknown slot"):
        model.set_primary(state, "C", 1)


def test_state_must_list_each_slot_once_in_order() -> None:
    with pytest.raises(ValueError, match="order"):
        BootState(("A",), {"A": GOOD, "B": GOOD})
