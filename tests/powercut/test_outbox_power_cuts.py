"""The outbox under the power-cut model: a report the event log acknowledged
survives a cut, also the first one, which creates the file; and a torn append
costs only the torn record, never the next one."""

from __future__ import annotations

from pathlib import Path

from agent.events import Event
from agent.outbox import EventLog
from tests.powercut.test_crash_model import traced, tree


def test_the_first_acknowledged_report_survives_a_power_cut_right_after(tmp_path: Path) -> None:
    state_dir = tmp_path / "root" / "state"
    state_dir.mkdir(parents=True)
    trace = traced(
        tmp_path / "root", tmp_path / "log", lambda: EventLog(state_dir).emit(Event(event="install", result="ok"))
    )
    files = tree(trace, len(trace.ops), "synced")  # emit returned: the report is acknowledged
    assert any(b'"install"' in data for data in files.values()), files


def test_a_torn_append_loses_only_the_torn_record(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    log = EventLog(state_dir)
    log.emit(Event(event="install", result="started", txn="t1"))
    path = state_dir / "outbox.log"
    with path.open("ab") as f:  # what a power cut mid-append leaves: half a record, no newline
        f.write(b'{"event": "install", "result": "o')
    log.emit(Event(event="install", result="ok", txn="t1"))
    kept = [(r.event.event, r.event.result) for r in log.outbox.pending()]
    assert kept[0] == ("install", "started")
    assert kept[-1] == ("install", "ok")
