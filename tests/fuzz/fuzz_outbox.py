"""Fuzz the outbox reader (agent.outbox.Outbox) on an outbox file holding
arbitrary bytes (the pure parser on every input): a torn or corrupt record is skipped or the file set aside and
reported, never raised; the outbox stays usable (an append after it works)."""

from __future__ import annotations

import zlib

from agent.events import Event
from agent.outbox import Outbox, parse
from tests.fuzz._harness import main, scratch_dir


def one_input(data: bytes) -> None:
    parse(data)
    if zlib.crc32(data) % 8:
        return  # the on-disk path (set aside, repair, append) on one input in eight: it fsyncs
    box = Outbox(scratch_dir())
    box.path.write_bytes(data)
    box.pending()
    box.append(Event(event="install", result="ok"))
    assert box.pending()[-1].event.result == "ok"


if __name__ == "__main__":
    main(one_input)
