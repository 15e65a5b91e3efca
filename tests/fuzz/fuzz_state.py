"""Fuzz the agent state reader on arbitrary bytes: the pure parser
(agent.state.parse) on every input, and the store's load on a state.json holding
them (which sets a damaged file aside and reports it) on one input in eight, since
each set-aside costs fsyncs. Nothing but a recovered state may come out."""

from __future__ import annotations

import zlib

from agent.state import StateStore, parse
from tests.fuzz._harness import main, scratch_dir


def one_input(data: bytes) -> None:
    parse(data)
    if zlib.crc32(data) % 8 == 0:
        store = StateStore(scratch_dir())
        store.path.write_bytes(data)
        store.load()


if __name__ == "__main__":
    main(one_input)
