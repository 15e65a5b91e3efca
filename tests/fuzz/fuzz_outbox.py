"""Fuzz the outbox reader (agent.events.EventLog.pending) on an outbox.jsonl
holding arbitrary bytes: corrupt records are to be skipped, never raised.
Thin on purpose: the reader is another module's, and changes in parallel."""

from __future__ import annotations

from agent.events import EventLog
from tests.fuzz._harness import main, scratch_dir


def one_input(data: bytes) -> None:
    log = EventLog(scratch_dir())
    log.path.write_bytes(data)
    log.pending()


if __name__ == "__main__":
    main(one_input)
