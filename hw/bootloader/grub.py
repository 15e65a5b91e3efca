"""GRUB backend: `BootState` <-> grubenv variables, RAUC-compatible.

This module owns the mapping between the boot-counting model and the variables
in the GRUB environment block; the block's byte format is `grubenv.py`, the
counting rules are `model.py`, and the GRUB side of the same rules is the
shipped snippet ``hw/scripts/grub.cfg``.

Variables (``x`` is a bootname, e.g. ``A``):

    ORDER           "A B"   bootnames by priority                      (RAUC)
    x_OK            1 | 0   the slot may be booted at all              (RAUC)
    x_TRY           0 | 1   1 = the slot was tried and not confirmed   (RAUC)
    OTA_x_LEFT      0..9    tries left while the slot is on trial      (ours)
    OTA_LAST_GOOD   x       the last committed slot, fallback target   (ours)

Mapping (exact, both directions):

    GOOD            x_OK=1 x_TRY=0 OTA_x_LEFT unset
    TRIAL(n), n>0   x_OK=1 x_TRY=0 OTA_x_LEFT=n
    TRIAL(0)        x_OK=1 x_TRY=1 OTA_x_LEFT=0   (trial used up, not bootable)
    BAD             x_OK=0 x_TRY=0 OTA_x_LEFT unset

Reading is lenient only where the bootloader's behaviour is unambiguous:
``x_OK=0`` is BAD whatever else is set; ``x_OK=1 x_TRY=1`` is a used-up trial
whatever OTA_x_LEFT says (RAUC's stock script sets TRY=1 on every boot, so a
device still running it shows each booted slot this way until it is marked
good); a slot missing from ORDER is BAD (RAUC: not in ORDER, not good); an
empty OTA_x_LEFT counts as unset. Anything else unexpected (ORDER missing or
naming an unknown slot, a flag other than 0/1, a count other than 0..9, an
unknown OTA_LAST_GOOD) is a `BootEnvError` (`GrubEnvError`).

RAUC's userspace reads a slot as good iff it is in ORDER with OK=1 and TRY=0,
which here is GOOD or a pending trial; RAUC's stock GRUB script boots exactly
those, one try each, so a device can switch to this agent before (or without)
switching to our snippet. Only ``hw/scripts/grub.cfg`` honours OTA_x_LEFT
(several tries) and OTA_LAST_GOOD (no reset loop when nothing is bootable).

The counts are single digits (at most `MAX_TRIES`) because GRUB script has no
arithmetic (the snippet decrements through a table) and because a same-length
rewrite never moves bytes: GRUB's in-place ``save_env`` of a counter changes
only the digits, so even a write torn between sectors leaves a valid block.

Every store is read-modify-write: variables this backend does not own (e.g.
``saved_entry``, other slots' leftovers) keep their value and position.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from hw.bootloader.grubenv import EnvBlock, GrubEnvError, read_block, write_block
from hw.bootloader.model import BootState, SlotBoot, SlotBootState

MAX_TRIES = 9
ORDER = "ORDER"
LAST_GOOD = "OTA_LAST_GOOD"
_BOOTNAME = re.compile(r"[A-Za-z0-9_]{1,32}")
_FLAGS = ("0", "1")


def ok_var(bootname: str) -> str:
    return f"{bootname}_OK"


def try_var(bootname: str) -> str:
    return f"{bootname}_TRY"


def left_var(bootname: str) -> str:
    return f"OTA_{bootname}_LEFT"


def owned_vars(bootnames: Sequence[str]) -> tuple[str, ...]:
    """Every variable this backend reads and writes; all others are left alone."""
    per_slot = (f(b) for b in bootnames for f in (ok_var, try_var, left_var))
    return (ORDER, *per_slot, LAST_GOOD)


def check_bootnames(bootnames: Sequence[str]) -> tuple[str, ...]:
    names = tuple(bootnames)
    if not names:
        raise GrubEnvError("no slots configured")
    if len(set(names)) != len(names):
        raise GrubEnvError(f"bootnames repeat: {' '.join(names)}")
    for b in names:
        if not _BOOTNAME.fullmatch(b):
            raise GrubEnvError(f"bootname {b!r} cannot be part of a GRUB variable name (use letters, digits, '_')")
    return names


def encode_slot(slot: SlotBoot) -> tuple[str, str, str | None]:
    """(x_OK, x_TRY, OTA_x_LEFT or None for unset) for one slot."""
    if slot.state is SlotBootState.GOOD:
        return "1", "0", None
    if slot.state is SlotBootState.BAD:
        return "0", "0", None
    if not 0 <= slot.tries_left <= MAX_TRIES:
        raise GrubEnvError(
            f"{slot.tries_left} tries do not fit: GRUB script has no arithmetic, the snippet counts 0..{MAX_TRIES}"
        )
    if slot.tries_left == 0:
        return "1", "1", "0"
    return "1", "0", str(slot.tries_left)


def encode(state: BootState, block: EnvBlock) -> None:
    """Write `state` into `block` (in place), touching only the owned variables."""
    block.set(ORDER, " ".join(state.order))
    for name in state.order:
        ok, tried, left = encode_slot(state.slots[name])
        block.set(ok_var(name), ok)
        block.set(try_var(name), tried)
        if left is None:
            block.unset(left_var(name))
        else:
            block.set(left_var(name), left)
    if state.last_good is None:
        block.unset(LAST_GOOD)
    else:
        block.set(LAST_GOOD, state.last_good)


def decode_slot(bootname: str, ok: str | None, tried: str | None, left: str | None) -> SlotBoot:
    for var, value in ((ok_var(bootname), ok), (try_var(bootname), tried)):
        if value is None:
            raise GrubEnvError(f"{var} is not set")
        if value not in _FLAGS:
            raise GrubEnvError(f"{var}={value!r}, expected 0 or 1")
    if left == "":
        left = None
    if left is not None and not (len(left) == 1 and left.isdigit()):
        raise GrubEnvError(f"{left_var(bootname)}={left!r}, expected a count 0..{MAX_TRIES}")
    if ok == "0":
        return SlotBoot(SlotBootState.BAD)
    if tried == "1":
        return SlotBoot(SlotBootState.TRIAL, 0)
    if left is None:
        return SlotBoot(SlotBootState.GOOD)
    return SlotBoot(SlotBootState.TRIAL, int(left))


def decode(block: EnvBlock, bootnames: Sequence[str]) -> BootState:
    names = tuple(bootnames)
    order_text = block.get(ORDER)
    if not order_text or not order_text.split():
        raise GrubEnvError(f"{ORDER} is not set or empty")
    words = order_text.split()
    unknown = [w for w in words if w not in names]
    if unknown:
        raise GrubEnvError(f"{ORDER}={order_text!r} names unknown slots {unknown}; slots are {list(names)}")
    if len(set(words)) != len(words):
        raise GrubEnvError(f"{ORDER}={order_text!r} lists a slot twice")
    slots = {b: decode_slot(b, block.get(ok_var(b)), block.get(try_var(b)), block.get(left_var(b))) for b in names}
    missing = [b for b in names if b not in words]
    for b in missing:
        slots[b] = SlotBoot(SlotBootState.BAD)
    last_good = block.get(LAST_GOOD) or None
    if last_good is not None and last_good not in names:
        raise GrubEnvError(f"{LAST_GOOD}={last_good!r} is not one of the slots {list(names)}")
    return BootState(order=(*words, *missing), slots=slots, last_good=last_good)


class GrubEnv:
    """`BootEnv` backend on a grubenv file (``grub`` in the registry)."""

    name = "grub"

    def __init__(self, path: Path, bootnames: Sequence[str]) -> None:
        self.path = Path(path)
        self.bootnames = check_bootnames(bootnames)

    def create(self) -> None:
        """A fresh block (as ``grub-editenv FILE create``) holding `BootState.initial`."""
        block = EnvBlock.fresh()
        self._encode(BootState.initial(self.bootnames), block)
        write_block(self.path, block)

    def load(self) -> BootState:
        return self._decode(read_block(self.path))

    def store(self, state: BootState) -> None:
        if set(state.slots) != set(self.bootnames):
            raise GrubEnvError(
                f"state has slots {sorted(state.slots)}, config has {list(self.bootnames)}", path=str(self.path)
            )
        block = read_block(self.path)
        self._encode(state, block)
        write_block(self.path, block)

    def _encode(self, state: BootState, block: EnvBlock) -> None:
        try:
            encode(state, block)
        except GrubEnvError as e:
            raise GrubEnvError(e.reason, path=str(self.path)) from None

    def _decode(self, block: EnvBlock) -> BootState:
        try:
            return decode(block, self.bootnames)
        except GrubEnvError as e:
            raise GrubEnvError(e.reason, path=str(self.path)) from None
