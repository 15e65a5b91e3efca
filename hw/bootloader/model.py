"""The boot-counting model every bootloader backend stores, and its rules.

This module owns *what* the bootloader state means and how it changes; it does
not own where the state lives (each backend in this package is a codec between
`BootState` and one bootloader's storage: a U-Boot environment, a grubenv block,
BLS entry file names, or the simulator's JSON file).

The rules (implemented here in Python, and in the shipped U-Boot / GRUB scripts):

* ``order`` lists bootnames by priority. Each slot is GOOD (committed), BAD
  (never boot it) or TRIAL with ``tries_left``.
* Power-on walks ``order``: the first GOOD slot boots without touching any
  counter; a TRIAL slot with tries left boots after its counter is decremented;
  BAD slots and exhausted trials are skipped.  Counting only while a trial is
  pending means power cuts never erode a committed slot.
* When nothing in ``order`` is bootable, the last committed slot (``last_good``)
  boots instead of reset-looping; failing that, the first slot in ``order``.
* ``set_primary(slot, tries)`` puts the slot first, on trial; ``mark_good``
  commits it and records it as ``last_good``; ``mark_bad`` makes it unbootable.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol


class SlotBootState(enum.Enum):
    GOOD = "good"
    BAD = "bad"
    TRIAL = "trial"


@dataclass(frozen=True, slots=True)
class SlotBoot:
    state: SlotBootState
    tries_left: int = 0

    @property
    def bootable(self) -> bool:
        return self.state is SlotBootState.GOOD or (
            self.state is SlotBootState.TRIAL and self.tries_left > 0
        )

    def describe(self) -> str:
        if self.state is SlotBootState.TRIAL:
            return f"on trial, {self.tries_left} tries left"
        return str(self.state.value)


@dataclass(frozen=True, slots=True)
class BootState:
    order: tuple[str, ...]
    slots: Mapping[str, SlotBoot]
    last_good: str | None = None

    def __post_init__(self) -> None:
        if sorted(self.order) != sorted(self.slots):
            raise ValueError(f"order {self.order} does not list exactly the slots {sorted(self.slots)}")
        if self.last_good is not None and self.last_good not in self.slots:
            raise ValueError(f"last_good {self.last_good!r} is not a slot")

    @classmethod
    def initial(cls, bootnames: tuple[str, ...]) -> BootState:
        """Every slot committed, the first one primary (a freshly provisioned device)."""
        return cls(
            order=bootnames,
            slots={b: SlotBoot(SlotBootState.GOOD) for b in bootnames},
            last_good=bootnames[0],
        )

    def with_slot(self, bootname: str, slot: SlotBoot) -> BootState:
        self._require(bootname)
        return replace(self, slots={**self.slots, bootname: slot})

    def _require(self, bootname: str) -> None:
        if bootname not in self.slots:
            raise KeyError(f"unknown slot {bootname!r}; slots are {', '.join(self.order)}")


@dataclass(frozen=True, slots=True)
class BootDecision:
    slot: str
    reason: str
    trial: bool


def choose(state: BootState) -> tuple[BootState, BootDecision]:
    """One power-on: which slot boots, and the state the bootloader saves first."""
    for name in state.order:
        slot = state.slots[name]
        if slot.state is SlotBootState.GOOD:
            return state, BootDecision(name, "committed slot", trial=False)
        if slot.state is SlotBootState.TRIAL and slot.tries_left > 0:
            left = slot.tries_left - 1
            new = state.with_slot(name, SlotBoot(SlotBootState.TRIAL, left))
            return new, BootDecision(name, f"trial boot, {left} tries left after this one", trial=True)
    if state.last_good is not None:
        return state, BootDecision(
            state.last_good, "no bootable slot in order; last committed slot", trial=False
        )
    return state, BootDecision(state.order[0], "no bootable slot and no committed slot", trial=False)


def next_boot(state: BootState) -> str:
    """The slot the next power-on would boot (the 'primary'), without changing anything."""
    return choose(state)[1].slot


def set_primary(state: BootState, bootname: str, tries: int) -> BootState:
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    state._require(bootname)
    order = (bootname, *(b for b in state.order if b != bootname))
    return replace(state.with_slot(bootname, SlotBoot(SlotBootState.TRIAL, tries)), order=order)


def mark_good(state: BootState, bootname: str) -> BootState:
    return replace(state.with_slot(bootname, SlotBoot(SlotBootState.GOOD)), last_good=bootname)


def mark_bad(state: BootState, bootname: str) -> BootState:
    new = state.with_slot(bootname, SlotBoot(SlotBootState.BAD))
    if new.last_good == bootname:
        others = [b for b in new.order if new.slots[b].state is SlotBootState.GOOD]
        new = replace(new, last_good=others[0] if others else None)
    return new


class BootEnv(Protocol):
    """Where one bootloader keeps `BootState`. Backends translate every OSError,
    parse error or tool failure into `hw.errors.BootEnvError`; a failed read or
    write is always an exception, never a silent default."""

    name: str

    def create(self) -> None:
        """Write a fresh environment equal to `BootState.initial(bootnames)`."""

    def load(self) -> BootState: ...

    def store(self, state: BootState) -> None: ...
