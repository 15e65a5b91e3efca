"""An event is bounded and single-line by construction, in memory and in the
outbox file, whoever builds it and whatever text it was given."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.events import LIMITS, Event
from agent.outbox import FILE, MAX_RECORD_BYTES, Outbox

HOSTILE = ("reason\n" * 150_000) + "\x1b[31mred\x1b[0m\nota-agent: install: ok\n"  # > 1 MB, many lines


def test_every_field_is_cut_to_its_limit_and_kept_on_one_line() -> None:
    event = Event(
        event=HOSTILE, result=HOSTILE, reason=HOSTILE, txn=HOSTILE, bundle_version=HOSTILE, slot=HOSTILE, time=HOSTILE
    )
    for name, limit in LIMITS.items():
        value = getattr(event, name)
        assert len(value) <= limit, name
        assert "\n" not in value
        assert value.endswith("…")
    assert event.reason.startswith("reason\\nreason\\n")
    assert {LIMITS["reason"], LIMITS["txn"], LIMITS["bundle_version"], LIMITS["slot"]} == {300, 128}


def test_an_escape_sequence_and_a_fake_log_line_are_escaped() -> None:
    event = Event(
        event="install", result="failed", reason="\x1b[2K\rota-agent: install: ok\n", slot="B\nota-agent: commit: ok"
    )
    assert event.reason == "\\x1b[2K\\rota-agent: install: ok\\n"
    assert event.slot == "B\\nota-agent: commit: ok"


def test_an_event_read_back_from_a_file_is_cleaned_and_checked() -> None:
    event = Event.from_json({"event": "install", "result": "ok", "reason": HOSTILE, "unknown": 1})
    assert len(event.reason) <= 300
    with pytest.raises(ValueError, match="'result'"):
        Event.from_json({"event": "install"})
    with pytest.raises(ValueError, match="'slot'"):
        Event.from_json({"event": "install", "result": "ok", "slot": 7})


def test_an_outbox_record_of_a_hostile_event_is_one_bounded_line(tmp_path: Path) -> None:
    Outbox(tmp_path).append(
        Event(
            event=HOSTILE,
            result=HOSTILE,
            reason=HOSTILE,
            txn=HOSTILE,
            bundle_version=HOSTILE,
            slot=HOSTILE,
            time=HOSTILE,
        )
    )
    data = (tmp_path / FILE).read_bytes()
    assert data.count(b"\n") == 1
    assert len(data) <= MAX_RECORD_BYTES
    assert b"\x1b" not in data
