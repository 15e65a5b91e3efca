"""Regression tests for crashes the fuzz harnesses (tests/fuzz/) found in
readers of untrusted bytes.

The outbox, state and config readers: invalid UTF-8 (found by fuzz_outbox),
nesting past the recursion limit and a NUL in a path (found while writing the
harnesses). Findings in bundler/format are tested beside the format's tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load
from agent.events import Event
from agent.outbox import EventLog
from agent.state import StateStore
from ota_common.errors import OtaError
from tests.fuzz.seeds import CONFIG

DEEP = 100_000  # nesting far past Python's recursion limit



def outbox_with_garbage_between_two_records(directory: Path, garbage: bytes) -> EventLog:
    """Records written through the public API, hostile bytes appended between them."""
    log = EventLog(directory)
    log.emit(Event(event="install", result="ok", reason="first"))
    with log.outbox.path.open("ab") as f:
        f.write(garbage)
    log.emit(Event(event="boot", result="ok", reason="second"))
    return log


def test_outbox_with_invalid_utf8_keeps_its_valid_records(tmp_path: Path) -> None:
    log = outbox_with_garbage_between_two_records(tmp_path, b"\xff\xd8 torn\n")
    kept = [r.event.reason for r in log.outbox.pending() if r.event.reason in ("first", "second")]
    assert kept == ["first", "second"]


def test_outbox_with_a_deeply_nested_record_keeps_its_valid_records(tmp_path: Path) -> None:
    log = outbox_with_garbage_between_two_records(tmp_path, b"[" * DEEP + b"\n")
    kept = [r.event.reason for r in log.outbox.pending() if r.event.reason in ("first", "second")]
    assert kept == ["first", "second"]


def test_deeply_nested_state_file_is_set_aside_and_the_agent_goes_on(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(b'{"slots": ' + b"[" * DEEP + b"}")
    assert store.load().slots == {}
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


def test_deeply_nested_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(CONFIG + b"\n[extra]\nx = " + b"[" * DEEP)
    with pytest.raises(OtaError, match=r"agent\.toml"):
        load(path)


def test_config_path_with_a_nul_byte_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(CONFIG.replace(b'path = "slot-A.img"', b'path = "slot\\u0000A.img"'))
    with pytest.raises(OtaError, match=r"agent\.toml"):
        load(path)
