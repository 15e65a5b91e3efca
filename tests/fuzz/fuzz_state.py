"""Fuzz the agent state reader (agent.state.StateStore.load) on a state.json
holding arbitrary bytes. Documented error: ConfigError (an OtaError).
Thin on purpose: the reader is another module's, and changes in parallel."""

from __future__ import annotations

from agent.state import StateStore
from tests.fuzz._harness import main, scratch_dir


def one_input(data: bytes) -> None:
    store = StateStore(scratch_dir())
    store.path.write_bytes(data)
    store.load()


if __name__ == "__main__":
    main(one_input)
