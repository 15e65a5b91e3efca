"""Fuzz the agent's config loader (agent.config.load) on a file holding
arbitrary bytes. The loader's documented error is ConfigError (an OtaError).
Thin on purpose: the loader is another module's, and changes in parallel."""

from __future__ import annotations

from agent.config import load
from tests.fuzz._harness import main, scratch_dir


def one_input(data: bytes) -> None:
    path = scratch_dir() / "agent.toml"
    path.write_bytes(data)
    load(path)


if __name__ == "__main__":
    main(one_input)
