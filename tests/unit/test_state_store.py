"""The agent state: bounded by construction, and a damaged state.json or
security-floor never locks the device out nor lowers the anti-rollback floor."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import InstallError
from agent.events import CONFLICT_LIMITS, LIMITS, MAX_CONFLICTS, EtcConflict, Event
from agent.outbox import EventLog, Outbox
from agent.state import (
    FLOOR_FILE,
    MAX_SECURITY_VERSION,
    MAX_SLOTS,
    MAX_STATE,
    STATE_BOUND,
    AgentState,
    SlotRecord,
    StateStore,
    Trial,
    encode,
)

HOSTILE = "line one\nota-agent: install: ok\r\x1b[2K" + "\u2028" + "x" * (1 << 20)
WIDE = "\U0001f600"  # the most bytes one cleaned character can cost in the file


def store(d: Path) -> StateStore:
    return StateStore(d, EventLog(d))


def state_events(d: Path) -> list[Event]:
    return [r.event for r in Outbox(d).pending() if r.event.event == "state"]


def assert_one_clean_line(text: str | None, limit: int) -> None:
    assert text is not None
    assert len(text) <= limit
    assert "\n" not in text
    assert "\r" not in text
    assert "\x1b" not in text
    assert "\u2028" not in text


# --- bounded by construction -----------------------------------------------


def test_slot_and_trial_records_are_cleaned_when_built() -> None:
    record = SlotRecord(version=HOSTILE, sha256=HOSTILE, security_version=3, installed=HOSTILE)
    trial = Trial(HOSTILE, HOSTILE, HOSTILE, 1, sha256=HOSTILE, failure=HOSTILE)
    for value in (record.version, record.sha256, trial.slot, trial.txn, trial.bundle_version, trial.sha256):
        assert_one_clean_line(value, 128)
    assert_one_clean_line(record.installed, 64)
    assert_one_clean_line(trial.failure, 300)
    assert trial.failure is not None
    assert trial.failure.startswith("line one\\nota-agent: install: ok\\r\\x1b[2K\\u2028x")
    assert trial.failure.endswith("…")


def test_the_last_result_is_cleaned_too() -> None:
    state = AgentState(last_result=Event(event="install", result="failed", reason=HOSTILE, txn=HOSTILE))
    assert state.last_result is not None
    assert_one_clean_line(state.last_result.reason, 300)
    assert_one_clean_line(state.last_result.txn, 128)


def test_out_of_range_numbers_and_too_many_slots_are_refused_when_built() -> None:
    with pytest.raises(ValueError, match="committed_security_version"):
        AgentState(committed_security_version=-1)
    with pytest.raises(ValueError, match="security_version"):
        SlotRecord(security_version=MAX_SECURITY_VERSION + 1)
    with pytest.raises(ValueError, match="slot records"):
        AgentState(slots={str(i): SlotRecord() for i in range(MAX_SLOTS + 1)})


def worst_case_state() -> AgentState:
    images = {f"{i:x}" + "c" * 127: "f" * 64 for i in range(MAX_SLOTS)}
    slot = SlotRecord(WIDE * 999, WIDE * 999, MAX_SECURITY_VERSION, WIDE * 999, images)
    trial = Trial(WIDE * 999, WIDE * 999, WIDE * 999, MAX_SECURITY_VERSION, WIDE * 999, True, WIDE * 9999, images)
    conflict = EtcConflict(**{name: WIDE * 9999 for name in CONFLICT_LIMITS})
    event = Event(**{name: WIDE * 9999 for name in LIMITS}, conflicts=(conflict,) * (MAX_CONFLICTS + 5))
    slots = {f"{i}{WIDE * 999}": slot for i in range(MAX_SLOTS)}
    return AgentState(MAX_SECURITY_VERSION, slots, trial, event)


def test_state_is_bounded_by_construction() -> None:
    worst = worst_case_state()
    assert len(worst.slots) == MAX_SLOTS
    size = len(encode(worst))
    assert size <= STATE_BOUND < MAX_STATE
    assert size > STATE_BOUND * 0.9  # the documented bound is tight, not a guess


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=5000), st.integers(0, MAX_SECURITY_VERSION))
def test_any_text_saved_in_the_state_reads_back_unchanged_and_small(
    tmp_path_factory: pytest.TempPathFactory, text: str, sv: int
) -> None:
    d = tmp_path_factory.mktemp("state")
    state = AgentState(
        sv,
        {text or "A": SlotRecord(text, text, sv, text)},
        Trial(text, text, text, sv, text, False, text),
        Event(event=text, result=text, reason=text, txn=text, bundle_version=text, slot=text, time=text),
    )
    store(d).save(state)
    assert (d / "state.json").stat().st_size <= STATE_BOUND
    assert store(d).load() == state
    assert not list(d.glob("*.corrupt-*"))


def test_save_refuses_a_state_its_reader_would_reject(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(AgentState(2))
    before = (tmp_path / "state.json").read_bytes()
    sneaky = SlotRecord()
    object.__setattr__(sneaky, "version", "v" * (MAX_STATE + 1))  # only by bypassing construction
    with pytest.raises(InstallError, match="refusing to save agent state"):
        s.save(AgentState(2, {"A": sneaky}))
    assert (tmp_path / "state.json").read_bytes() == before


def test_oversized_text_in_a_state_file_is_cleaned_when_loaded(tmp_path: Path) -> None:
    doc = {
        "committed_security_version": 1,
        "slots": {"A": {"version": HOSTILE[:5000], "sha256": None, "security_version": 1, "installed": None}},
        "trial": None,
        "last_result": {"event": "install", "result": "failed", "reason": HOSTILE[:500_000], "time": "t"},
    }
    (tmp_path / "state.json").write_text(json.dumps(doc))
    state = store(tmp_path).load()
    assert_one_clean_line(state.slots["A"].version, 128)
    assert state.last_result is not None
    assert_one_clean_line(state.last_result.reason, 300)
    assert state_events(tmp_path) == []  # long text is cleaned, not a reason to set the file aside


# --- the anti-rollback floor has two copies -----------------------------------


def test_raising_the_floor_writes_its_own_file_and_it_never_goes_down(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(AgentState(5))
    assert (tmp_path / FLOOR_FILE).read_text() == "5\n"
    s.save(AgentState(3))
    assert (tmp_path / FLOOR_FILE).read_text() == "5\n"
    assert s.load().committed_security_version == 5


def test_an_older_state_without_a_floor_file_gets_one(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps(AgentState(4).to_json()))
    assert store(tmp_path).load().committed_security_version == 4
    assert (tmp_path / FLOOR_FILE).read_text() == "4\n"
    assert state_events(tmp_path) == []


# --- damaged files are set aside, never a lock-out ---------------------------------


def saved_device(d: Path, floor: int = 6) -> StateStore:
    s = store(d)
    trial = Trial("B", "txn1", "2.0", floor, "ab" * 32, installed=True)
    s.save(AgentState(floor, {"A": SlotRecord("1.0", "cd" * 32, 1, "t")}, trial))
    return s


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("oversized", b'{"slots": {}, "last_result": {"reason": "' + b"x" * (2 << 20) + b'"}}', "larger than"),
        ("garbage", b"\x00\x01 not json at all", "not valid JSON"),
        ("truncated", b'{"slots": {"A": {"ver', "not valid JSON"),
        ("deeply nested", b"[" * 200_000, "not valid JSON"),
        ("not an object", b"[1, 2, 3]", "not a JSON object"),
        ("huge integer", b'{"committed_security_version": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_an_unreadable_state_is_set_aside_once_and_the_floor_kept_from_its_file(
    tmp_path: Path, name: str, content: bytes, problem: str
) -> None:
    saved_device(tmp_path, floor=6)
    (tmp_path / "state.json").write_bytes(content)
    state = store(tmp_path).load()
    assert state.committed_security_version == 6
    [aside] = tmp_path.glob("state.json.corrupt-*")
    assert aside.read_bytes() == content  # never deleted
    [event] = state_events(tmp_path)
    assert (event.event, event.result) == ("state", "set-aside")
    assert event.reason.startswith("state set aside: ")
    assert problem in event.reason
    assert f"moved to {aside.name}" in event.reason
    assert "security floor 6 kept (from security-floor)" in event.reason
    assert store(tmp_path).load() == state  # said once: the recovered state was saved
    assert len(state_events(tmp_path)) == 1


def test_the_floor_is_read_from_the_start_of_a_damaged_state_when_its_file_is_gone(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b'{\n  "committed_security_version": 9,\n  "slots": {' + b"x" * (2 << 20))
    state = store(tmp_path).load()
    assert state.committed_security_version == 9
    assert (tmp_path / FLOOR_FILE).read_text() == "9\n"
    [event] = state_events(tmp_path)
    assert "security floor 9 kept (from state.json)" in event.reason


def test_losing_both_copies_of_the_floor_is_said_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    saved_device(tmp_path, floor=6)
    (tmp_path / "state.json").write_bytes(b"garbage")
    (tmp_path / FLOOR_FILE).write_bytes(b"\xff\xfe")
    with caplog.at_level(logging.WARNING):
        state = store(tmp_path).load()
    assert state.committed_security_version == 0
    results = [(e.result, e.reason) for e in state_events(tmp_path)]
    assert [r for r, _ in results] == ["set-aside", "set-aside", "floor-lost"]
    lost = results[-1][1]
    assert "anti-rollback protection reset" in lost
    assert [r.levelno for r in caplog.records if "anti-rollback" in r.getMessage()] == [logging.ERROR]
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 2


def test_a_damaged_floor_file_is_rewritten_from_the_state(tmp_path: Path) -> None:
    saved_device(tmp_path, floor=6)
    (tmp_path / FLOOR_FILE).write_bytes(b"12abc\n")
    assert store(tmp_path).load().committed_security_version == 6
    assert (tmp_path / FLOOR_FILE).read_text() == "6\n"
    [event] = state_events(tmp_path)
    assert event.reason.startswith("security floor file set aside: ")


def test_the_higher_floor_wins_after_a_cut_between_the_two_writes(tmp_path: Path) -> None:
    saved_device(tmp_path, floor=6)
    (tmp_path / FLOOR_FILE).write_text("8\n")  # raised, then the power went before state.json was replaced
    assert store(tmp_path).load().committed_security_version == 8
    assert state_events(tmp_path) == []


def test_each_section_that_still_parses_is_kept(tmp_path: Path) -> None:
    saved_device(tmp_path, floor=6)
    doc = json.loads((tmp_path / "state.json").read_text())
    doc["trial"]["security_version"] = "six"
    doc["slots"]["B"] = {"version": 7}
    doc["last_result"] = {"event": "install"}
    (tmp_path / "state.json").write_text(json.dumps(doc))
    state = store(tmp_path).load()
    assert state.committed_security_version == 6
    assert state.slots == {"A": SlotRecord("1.0", "cd" * 32, 1, "t")}
    assert state.trial is None
    assert state.last_result is None
    [event] = state_events(tmp_path)
    for fragment in ("trial.security_version", "slots.B.version", "last_result"):
        assert fragment in event.reason


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_state_path_that_is_not_a_regular_file_is_set_aside_without_blocking(tmp_path: Path, kind: str) -> None:
    saved_device(tmp_path, floor=6)
    path = tmp_path / "state.json"
    path.unlink()
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps(AgentState(1).to_json()))
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(victim)
    assert store(tmp_path).load().committed_security_version == 6
    assert path.is_file()
    assert not path.is_symlink()
    assert victim.read_text() == json.dumps(AgentState(1).to_json())
    [event] = state_events(tmp_path)
    assert "unreadable" in event.reason
