"""The status outbox stays bounded, drops progress records before results,
and keeps the newest reports."""

from __future__ import annotations

import logging
from pathlib import Path

from agent.events import MAX_OUTBOX_BYTES, Event, EventLog


def test_outbox_stays_under_its_byte_budget_dropping_progress_before_results(tmp_path: Path) -> None:
    logging.getLogger("agent.events").setLevel(logging.WARNING)
    log = EventLog(tmp_path)
    for i in range(4000):
        log.emit(Event("progress" if i % 2 else "install", "ok", "x" * 50, txn=str(i)))
    assert (tmp_path / "outbox.jsonl").stat().st_size <= MAX_OUTBOX_BYTES
    kept = log.pending()
    assert kept[-1].txn == "3999"
    results = [e for e in kept if e.event == "install"]
    progress = [e for e in kept if e.event == "progress"]
    assert len(results) > len(progress)
    assert [int(e.txn or 0) for e in kept] == sorted(int(e.txn or 0) for e in kept)
