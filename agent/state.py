"""The agent's persistent state (`STATE_DIR/state.json`), replaced atomically.

Owns: the committed security version floor, what is installed in each slot,
the pending trial (which slot, which bundle, and why it failed if it did), and
the last result. Does not own boot counting, which lives in the bootloader.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, LockBusyError
from agent.events import Event
from hw.fsutil import atomic_write, open_regular, read_regular

MAX_STATE = 1 << 20


@dataclass(frozen=True, slots=True)
class SlotRecord:
    version: str | None = None
    sha256: str | None = None
    security_version: int | None = None
    installed: str | None = None  # ISO time


@dataclass(frozen=True, slots=True)
class Trial:
    """An update in flight: written while installing (``installed`` False), made
    complete once the slot verified and the bootloader was told to try it, and
    cleared by boot-check at commit or rollback."""

    slot: str
    txn: str
    bundle_version: str
    security_version: int
    sha256: str | None = None
    installed: bool = False
    failure: str | None = None  # set when boot-check gave up on it


@dataclass(frozen=True, slots=True)
class AgentState:
    committed_security_version: int = 0
    slots: dict[str, SlotRecord] = field(default_factory=dict)
    trial: Trial | None = None
    last_result: Event | None = None  # the last outcome an operator cares about

    def with_slot(self, bootname: str, record: SlotRecord) -> AgentState:
        return replace(self, slots={**self.slots, bootname: record})

    def to_json(self) -> dict[str, Any]:
        return {
            "committed_security_version": self.committed_security_version,
            "slots": {k: asdict(v) for k, v in sorted(self.slots.items())},
            "trial": asdict(self.trial) if self.trial else None,
            "last_result": asdict(self.last_result) if self.last_result else None,
        }


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"

    def load(self) -> AgentState:
        try:
            raw = read_regular(self.path, MAX_STATE + 1)
        except FileNotFoundError:
            return AgentState()
        except OSError as e:
            raise ConfigError(str(self.path), "", f"cannot read agent state: {e.strerror}") from None
        try:
            if len(raw) > MAX_STATE:
                raise ValueError(f"larger than {MAX_STATE} bytes")
            doc = json.loads(raw)
            trial = doc.get("trial")
            last = doc.get("last_result")
            return AgentState(
                committed_security_version=int(doc.get("committed_security_version", 0)),
                slots={str(k): SlotRecord(**v) for k, v in doc.get("slots", {}).items()},
                trial=Trial(**trial) if trial else None,
                last_result=Event(**last) if last else None,
            )
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(str(self.path), "", f"agent state is corrupt: {e}") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for changes that span several steps (an install, a boot-check);
        raises LockBusyError at once when another process holds it."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = open_regular(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(str(self.dir / "lock"), "", f"cannot open the state lock: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockBusyError(f"another install is in progress (lock held on {self.dir / 'lock'})") from None
            yield
        finally:
            os.close(fd)

    def save(self, state: AgentState) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(state.to_json(), indent=2).encode() + b"\n")
