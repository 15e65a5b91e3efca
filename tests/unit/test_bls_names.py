"""BLS entry names and the pure parts of the codec: counters, systemd-boot's
menu order and rename series, systemd-bless-boot's good/bad names, and the
rename plan for each agent verb."""

from __future__ import annotations

import pytest

from hw.bootloader import model
from hw.bootloader.bls import (
    Entry,
    decode,
    entry_name,
    next_attempt_name,
    parse_entry_name,
    plan_renames,
    sd_boot_order,
)
from hw.bootloader.model import BootState, SlotBoot, SlotBootState


def test_names_round_trip_with_and_without_counters() -> None:
    assert entry_name("A", 2, None) == "ota-2-A.conf"
    assert entry_name("A", 2, 3) == "ota-2-A+3.conf"
    assert entry_name("A", 2, 1, 2) == "ota-2-A+1-2.conf"
    for name in ("ota-2-A.conf", "ota-2-A+3.conf", "ota-2-A+1-2.conf", "ota-17-system0+0-4.conf"):
        e = parse_entry_name(name)
        assert e is not None
        assert entry_name(e.slot, e.generation, e.tries_left, e.tries_done) == name


def test_missing_done_counter_means_zero_as_in_the_spec() -> None:
    e = parse_entry_name("ota-3-B+3.conf")
    assert e == Entry("B", 3, 3, 0, "ota-3-B+3.conf")


def test_entry_id_is_the_name_without_counter_lower_cased() -> None:
    e = parse_entry_name("ota-3-B+1-2.conf")
    assert e is not None
    assert e.id == "ota-3-b.conf"


@pytest.mark.parametrize(
    "name",
    ["loader.conf", "fedora-6.1.conf", "ota-A.conf", "ota-2-A+x.conf", "ota-2-A+1-2-3.conf", "ota-2-A+3.efi"],
)
def test_names_that_are_not_our_entry_format_do_not_parse(name: str) -> None:
    assert parse_entry_name(name) is None


def test_counter_series_matches_systemd_boot() -> None:
    # systemd-boot's own comment: foobar+3 -> +2-1 -> +1-2 -> +0-3, and a booted +0 entry keeps 0 left.
    series = ["ota-1-A+3.conf"]
    for _ in range(4):
        e = parse_entry_name(series[-1])
        assert e is not None
        nxt = next_attempt_name(e)
        assert nxt is not None
        series.append(nxt)
    assert series == ["ota-1-A+3.conf", "ota-1-A+2-1.conf", "ota-1-A+1-2.conf", "ota-1-A+0-3.conf", "ota-1-A+0-4.conf"]


def test_good_entry_is_not_renamed_on_boot() -> None:
    e = parse_entry_name("ota-1-A.conf")
    assert e is not None
    assert next_attempt_name(e) is None


def test_menu_order_puts_exhausted_entries_last_then_highest_generation_first() -> None:
    entries = [
        Entry("A", 9, None, 0, "ota-9-A.conf"),
        Entry("B", 10, 0, 3, "ota-10-B+0-3.conf"),
        Entry("C", 2, 1, 0, "ota-2-C+1.conf"),
        Entry("D", 11, 2, 1, "ota-11-D+2-1.conf"),
    ]
    assert [e.slot for e in sd_boot_order(entries)] == ["D", "A", "C", "B"]


def test_decode_orders_by_generation_and_derives_last_good() -> None:
    entries = [
        Entry("A", 2, None, 0, "ota-2-A.conf"),
        Entry("B", 3, 2, 1, "ota-3-B+2-1.conf"),
    ]
    state = decode(entries)
    assert state.order == ("B", "A")
    assert state.slots["B"] == SlotBoot(SlotBootState.TRIAL, 2)
    assert state.slots["A"] == SlotBoot(SlotBootState.GOOD)
    assert state.last_good == "A"
    assert model.next_boot(state) == "B"


def _current(*entries: Entry) -> dict[str, Entry]:
    return {e.slot: e for e in entries}


def test_each_agent_verb_is_exactly_one_rename() -> None:
    a, b = Entry("A", 2, None, 0, "ota-2-A.conf"), Entry("B", 1, None, 0, "ota-1-B.conf")
    state = decode([a, b])

    bad = model.mark_bad(state, "B")
    assert plan_renames(_current(a, b), bad) == [("ota-1-B.conf", "ota-1-B+0.conf")]

    b_bad = Entry("B", 1, 0, 0, "ota-1-B+0.conf")
    primary = model.set_primary(bad, "B", 3)
    assert plan_renames(_current(a, b_bad), primary) == [("ota-1-B+0.conf", "ota-3-B+3.conf")]

    b_trial = Entry("B", 3, 1, 2, "ota-3-B+1-2.conf")
    good = model.mark_good(decode([a, b_trial]), "B")
    assert plan_renames(_current(a, b_trial), good) == [("ota-3-B+1-2.conf", "ota-3-B.conf")]


def test_mark_bad_of_a_counted_entry_resets_its_counter_so_it_never_reads_as_a_last_try() -> None:
    a, b = Entry("A", 2, None, 0, "ota-2-A.conf"), Entry("B", 3, 1, 2, "ota-3-B+1-2.conf")
    state = model.mark_bad(decode([a, b]), "B")
    assert plan_renames(_current(a, b), state) == [("ota-3-B+1-2.conf", "ota-3-B+0.conf")]


def test_an_entry_on_its_last_try_is_a_used_up_trial_and_only_plus_zero_is_bad() -> None:
    # systemd-boot renames +1-2 to +0-3 before booting the last try: that boot must be
    # assessed as a trial, not skipped as a bad slot.
    last_try, bad = parse_entry_name("ota-3-B+0-3.conf"), parse_entry_name("ota-3-B+0.conf")
    assert last_try is not None
    assert bad is not None
    assert last_try.boot_state == SlotBoot(SlotBootState.TRIAL, 0)
    assert bad.boot_state == SlotBoot(SlotBootState.BAD)
    a, b = Entry("A", 2, None, 0, "ota-2-A.conf"), Entry("B", 3, 1, 0, "ota-3-B+1.conf")
    used_up = decode([a, b]).slots | {"B": SlotBoot(SlotBootState.TRIAL, 0)}
    state = BootState(order=("B", "A"), slots=used_up, last_good="A")
    assert plan_renames(_current(a, b), state) == [("ota-3-B+1.conf", "ota-3-B+0-1.conf")]


def test_storing_a_trial_decrement_continues_the_done_counter() -> None:
    a, b = Entry("A", 2, None, 0, "ota-2-A.conf"), Entry("B", 3, 3, 0, "ota-3-B+3.conf")
    after, decision = model.choose(decode([a, b]))
    assert decision.slot == "B"
    assert plan_renames(_current(a, b), after) == [("ota-3-B+3.conf", "ota-3-B+2-1.conf")]


def test_unchanged_state_needs_no_rename() -> None:
    a, b = Entry("A", 2, None, 0, "ota-2-A.conf"), Entry("B", 7, 2, 1, "ota-7-B+2-1.conf")
    assert plan_renames(_current(a, b), decode([a, b])) == []


def test_reordering_three_slots_gives_new_generations_above_all_current_ones() -> None:
    entries = [Entry("A", 3, None, 0, "ota-3-A.conf"), Entry("B", 2, None, 0, "ota-2-B.conf"),
               Entry("C", 1, None, 0, "ota-1-C.conf")]
    want = BootState(order=("C", "A", "B"), slots=decode(entries).slots, last_good="C")
    assert plan_renames(_current(*entries), want) == [("ota-1-C.conf", "ota-4-C.conf")]
