"""The simulated bootloader's storage: `BootState` as a JSON file, replaced
atomically. Used by `ota-agent sim` devices and tests; the counting rules are
the shared ones in `model.py`, exactly as the real bootloader scripts apply them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hw.bootloader.model import BootState, SlotBoot, SlotBootState
from hw.errors import BootEnvError
from ota_common.fsutil import atomic_write, read_regular

MAX_SIZE = 64 * 1024


class SimEnv:
    name = "sim"

    def __init__(self, path: Path, bootnames: Sequence[str]) -> None:
        self.path = path
        self.bootnames = tuple(bootnames)

    def create(self) -> None:
        self.store(BootState.initial(self.bootnames))

    def load(self) -> BootState:
        try:
            raw = read_regular(self.path, MAX_SIZE + 1)
        except OSError as e:
            raise BootEnvError(self.name, f"cannot read state: {e.strerror}", path=str(self.path)) from e
        if len(raw) > MAX_SIZE:
            raise BootEnvError(self.name, f"state file larger than {MAX_SIZE} bytes", path=str(self.path))
        try:
            doc = json.loads(raw)
            state = _decode(doc)
        except (ValueError, KeyError, TypeError) as e:
            raise BootEnvError(self.name, f"invalid state: {e}", path=str(self.path)) from e
        if set(state.order) != set(self.bootnames):
            raise BootEnvError(
                self.name,
                f"state lists slots {state.order}, config has {self.bootnames}",
                path=str(self.path),
            )
        return state

    def store(self, state: BootState) -> None:
        doc = {
            "order": list(state.order),
            "last_good": state.last_good,
            "slots": {
                name: {"state": s.state.value, "tries_left": s.tries_left}
                for name, s in state.slots.items()
            },
        }
        try:
            atomic_write(self.path, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
        except OSError as e:
            raise BootEnvError(self.name, f"cannot write state: {e.strerror}", path=str(self.path)) from e


def _decode(doc: Any) -> BootState:
    if not isinstance(doc, dict):
        raise TypeError("top level is not an object")
    slots = {}
    for name, s in doc["slots"].items():
        tries = s["tries_left"]
        if not isinstance(tries, int) or not 0 <= tries <= 255:
            raise ValueError(f"slot {name}: tries_left {tries!r} not in 0..255")
        slots[str(name)] = SlotBoot(SlotBootState(s["state"]), tries)
    last_good = doc.get("last_good")
    return BootState(order=tuple(doc["order"]), slots=slots, last_good=last_good)
