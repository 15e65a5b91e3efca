"""U-Boot backend: `BootState` as RAUC-compatible U-Boot environment variables.

Owns the mapping between the boot-counting model and the variables a U-Boot
boot script reads; the bytes on flash/disk are `uboot_env`'s job, the rules are
`model`'s, and the shipped script that applies them is ``hw/scripts/boot.cmd``.

Variables (a device running RAUC's stock U-Boot script already has the first two):

    BOOT_ORDER       every bootname, by priority, space-separated ("B A")
    BOOT_<x>_LEFT    boot attempts left for slot x, lower-case hex as RAUC writes it
    OTA_TRIAL        bootnames on trial, space-separated; unset when none
    OTA_LAST_GOOD    the last committed slot; unset when none

Mapping (slot x; "left" = BOOT_<x>_LEFT):

    state        BOOT_ORDER      left       OTA_TRIAL
    GOOD         listed          3          not listed
    TRIAL(n)     listed          n (hex)    listed
    BAD          listed          0          not listed

Reading applies the same defaults as the boot script and RAUC's script: unset or
empty BOOT_ORDER means "A B", unset left means 3. A slot missing from BOOT_ORDER
(RAUC's mark-bad removes it) reads as BAD and is placed last. A slot not on trial
reads as GOOD for *any* left > 0: RAUC's stock script decrements the first slot
on every boot, and RAUC users reset it with mark-good on every boot; every store
here writes 3 again for GOOD slots, so a device still booting with the stock
script stays committed as long as the agent marks the booted slot good on each
boot. Our boot.cmd never touches a GOOD slot's counter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from hw.bootloader.model import BootState, SlotBoot, SlotBootState
from hw.bootloader.uboot_env import UBootEnvStore
from hw.errors import BootEnvError

BACKEND = "uboot"
GOOD_LEFT = 3  # RAUC's default boot-attempts; what a GOOD slot's counter is reset to
DEFAULT_ORDER = ("A", "B")  # what boot.cmd and RAUC's script use when BOOT_ORDER is unset
MAX_LEFT = 0xFFFF
VAR_ORDER = "BOOT_ORDER"
VAR_TRIAL = "OTA_TRIAL"
VAR_LAST_GOOD = "OTA_LAST_GOOD"
_BOOTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_HEX = re.compile(r"(0[xX])?[0-9a-fA-F]{1,8}")


def left_var(bootname: str) -> str:
    return f"BOOT_{bootname}_LEFT"


def encode_state(state: BootState) -> dict[str, str | None]:
    """The variables that represent ``state``; None means "delete this variable"."""
    out: dict[str, str | None] = {VAR_ORDER: " ".join(state.order)}
    trial = []
    for name in state.order:
        slot = state.slots[name]
        if slot.state is SlotBootState.GOOD:
            left = GOOD_LEFT
        elif slot.state is SlotBootState.BAD:
            left = 0
        else:
            left = slot.tries_left
            trial.append(name)
        if not 0 <= left <= MAX_LEFT:
            raise BootEnvError(BACKEND, f"slot {name}: tries_left {left} not in 0..{MAX_LEFT}")
        out[left_var(name)] = f"{left:x}"
    out[VAR_TRIAL] = " ".join(trial) or None
    out[VAR_LAST_GOOD] = state.last_good
    return out


def decode_state(variables: Mapping[str, str], bootnames: Sequence[str]) -> BootState:
    """The state a boot script would act on, given these variables. Raises ValueError
    (with the variable's name) for anything the script and the agent could disagree on."""
    known = tuple(bootnames)
    words = variables.get(VAR_ORDER, "").split()
    if not words:
        if sorted(DEFAULT_ORDER) != sorted(known):
            raise ValueError(f"{VAR_ORDER} is not set and the default 'A B' does not name slots {' '.join(known)}")
        words = list(DEFAULT_ORDER)
    order: list[str] = []
    for w in words:
        if w not in known:
            raise ValueError(f"{VAR_ORDER}={variables.get(VAR_ORDER)!r} names unknown slot {w!r}")
        if w not in order:  # a repeated name changes nothing for the script: first one decides
            order.append(w)
    listed = set(order)
    order += [b for b in known if b not in listed]
    trial = set(variables.get(VAR_TRIAL, "").split())
    if trial - set(known):
        raise ValueError(f"{VAR_TRIAL}={variables[VAR_TRIAL]!r} names unknown slots {sorted(trial - set(known))}")
    slots: dict[str, SlotBoot] = {}
    for name in order:
        if name not in listed:
            slots[name] = SlotBoot(SlotBootState.BAD)
            continue
        raw = variables.get(left_var(name), "")
        if raw == "":
            left = GOOD_LEFT
        elif _HEX.fullmatch(raw):
            left = int(raw, 16)
        else:
            raise ValueError(f"{left_var(name)}={raw!r} is not a hex count")
        if name in trial:
            slots[name] = SlotBoot(SlotBootState.TRIAL, left)
        else:
            slots[name] = SlotBoot(SlotBootState.GOOD if left > 0 else SlotBootState.BAD)
    last_good = variables.get(VAR_LAST_GOOD) or None
    if last_good is not None and last_good not in known:
        raise ValueError(f"{VAR_LAST_GOOD}={last_good!r} is not a slot")
    return BootState(order=tuple(order), slots=slots, last_good=last_good)


class UBootEnv:
    """The `BootEnv` codec for U-Boot, on the environment a fw_env.config describes."""

    name = BACKEND

    def __init__(self, path: Path, bootnames: Sequence[str]) -> None:
        self.path = path
        self.bootnames = tuple(bootnames)
        if not self.bootnames or len(set(self.bootnames)) != len(self.bootnames):
            raise BootEnvError(BACKEND, f"bootnames must be distinct and non-empty, got {self.bootnames}")
        for b in self.bootnames:
            if not _BOOTNAME.fullmatch(b):
                raise BootEnvError(BACKEND, f"bootname {b!r} must match {_BOOTNAME.pattern}")
        self.storage = UBootEnvStore(path)

    def needs_refresh(self) -> bool:
        """True when the variables differ from what `store(load())` would write:
        RAUC's stock script counts a committed slot down on every boot."""
        variables = self.variables()
        try:
            wanted = encode_state(decode_state(variables, self.bootnames))
        except ValueError as e:
            raise BootEnvError(BACKEND, str(e), path=str(self.path)) from e
        return any(variables.get(k) != v for k, v in wanted.items())

    def variables(self) -> dict[str, str]:
        """Every variable of the current copy (for diagnostics and tests)."""
        return dict(self.storage.read().variables)

    def create(self) -> None:
        """Put ``BootState.initial`` in place. An existing valid env keeps all its other
        variables; absent storage is created holding only ours (a simulated device). An
        existing but invalid env is an error: see `UBootEnvStore.create`."""
        initial = BootState.initial(self.bootnames)
        cfg = self.storage.config()
        if any(c.device.exists() for c in cfg.copies):
            self.store(initial)
        else:
            self.storage.create({k: v for k, v in encode_state(initial).items() if v is not None})

    def load(self) -> BootState:
        variables = self.storage.read().variables
        try:
            return decode_state(variables, self.bootnames)
        except ValueError as e:
            raise BootEnvError(BACKEND, str(e), path=str(self.path)) from e

    def store(self, state: BootState) -> None:
        if sorted(state.slots) != sorted(self.bootnames):
            raise BootEnvError(BACKEND, f"state has slots {sorted(state.slots)}, config has {list(self.bootnames)}")
        self.storage.update(encode_state(state))
