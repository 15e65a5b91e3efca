"""Initialising a bootloader's state on a new device (`ota-agent bootloader init`).

Owns the decision "may this device's bootloader state be (re)initialised, and
how" for every backend in the registry; the state written is always
`BootState.initial(bootnames)` (every slot committed, the first one primary),
and *how* it is written is each backend's own codec (`create`/`store`).

What is found decides what happens (`probe`):

    ABSENT    nothing of ours (no file, a grubenv block or U-Boot env without our
              variables, no ``ota-*`` entries): initialise, no --force needed
    VALID     a state the backend reads: equal to the initial state -> nothing to
              do (so a re-run is harmless); anything else -> refused unless forced
    DAMAGED   our variables or entries are there but do not read as a state:
              refused unless forced, with the reason

How each backend initialises, keeping everything that is not ours:

    sim    the JSON file, replaced atomically
    uboot  our variables set in the existing env (every other variable kept), or
           new backing files holding only ours (a simulated device). A redundant
           pair ends with *both* copies valid. Storage that exists but holds no
           valid copy is refused even when forced: the board then runs on its
           built-in default env, and an env of ours alone would drop its bootcmd.
    grub   our variables set in the existing block (``saved_entry`` etc. kept), or
           a fresh block when there is none or it is not a grubenv block
    bls    existing entries renamed into the initial state (their kernel lines
           kept); template entries written when ours are missing or damaged
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from hw.bootloader import uboot_env
from hw.bootloader.bls import BlsEnv
from hw.bootloader.grub import GrubEnv, owned_vars
from hw.bootloader.grubenv import EnvBlock, read_block, write_block
from hw.bootloader.model import BootEnv, BootState
from hw.bootloader.simenv import SimEnv
from hw.bootloader.uboot import VAR_LAST_GOOD, VAR_ORDER, VAR_TRIAL, UBootEnv, left_var
from hw.errors import BootEnvError


class Found(enum.Enum):
    ABSENT = "absent"
    VALID = "valid"
    DAMAGED = "damaged"


class InitResult(enum.Enum):
    CREATED = "created"  # there was no state of ours
    REPLACED = "replaced"  # a state (valid or damaged) was overwritten: --force
    ALREADY = "already-initialised"  # the initial state was already in place: nothing written


@dataclass(frozen=True, slots=True)
class Probe:
    found: Found
    state: BootState | None = None
    problem: str = ""


@dataclass(frozen=True, slots=True)
class InitOutcome:
    backend: str
    result: InitResult
    state: BootState
    previous: str  # what was there before, for the report


def describe(state: BootState) -> str:
    slots = ", ".join(f"{b} {state.slots[b].describe()}" for b in state.order)
    return f"order {' '.join(state.order)} ({slots}), last good {state.last_good or 'none'}"


def probe(env: BootEnv) -> Probe:
    """What the backend's storage holds now, without changing it."""
    if not _has_ours(env):
        return Probe(Found.ABSENT)
    try:
        return Probe(Found.VALID, env.load())
    except BootEnvError as e:
        return Probe(Found.DAMAGED, problem=str(e))


def init_env(env: BootEnv, bootnames: tuple[str, ...], *, force: bool = False) -> InitOutcome:
    """Put `BootState.initial(bootnames)` in place, or refuse (`BootEnvError`)."""
    initial = BootState.initial(bootnames)
    found = probe(env)
    if found.found is Found.VALID and found.state == initial:
        _complete_redundancy(env, initial)
        return InitOutcome(env.name, InitResult.ALREADY, initial, describe(initial))
    if found.found is not Found.ABSENT and not force:
        what = describe(found.state) if found.state is not None else f"a damaged state: {found.problem}"
        raise BootEnvError(env.name, f"refusing to overwrite {what}; --force initialises it anyway")
    previous = "nothing" if found.found is Found.ABSENT else (
        describe(found.state) if found.state is not None else f"damaged ({found.problem})"
    )
    _initialise(env, initial, found)
    if env.load() != initial:
        raise BootEnvError(env.name, "state read back after initialising differs from what was written")
    result = InitResult.CREATED if found.found is Found.ABSENT else InitResult.REPLACED
    return InitOutcome(env.name, result, initial, previous)


def storage_paths(env: BootEnv) -> list[Path]:
    """The files or devices the backend writes (for `ota-agent doctor`)."""
    if isinstance(env, UBootEnv):
        return [c.device for c in env.storage.config().copies]
    if isinstance(env, BlsEnv):  # a new ESP has no loader/ yet: then the ESP itself must take it
        return [env.entries_dir, env.loader_conf] if env.entries_dir.parent.exists() else [env.entries_dir.parent]
    path = getattr(env, "path", None)
    return [Path(path)] if path is not None else []


# --- per backend ------------------------------------------------------------------


def _has_ours(env: BootEnv) -> bool:
    if isinstance(env, UBootEnv):
        cfg = env.storage.config()  # a missing or broken fw_env.config is an error, not "absent"
        if not any(c.device.exists() for c in cfg.copies):
            return False
        names = {VAR_ORDER, VAR_TRIAL, VAR_LAST_GOOD, *(left_var(b) for b in env.bootnames)}
        return bool(names & set(env.variables()))  # no valid copy at all: BootEnvError, refused below
    if isinstance(env, GrubEnv):
        if not env.path.exists():
            return False
        try:
            block = read_block(env.path)
        except BootEnvError:
            return True  # a file that is not a grubenv block: damaged
        return any(block.get(v) is not None for v in owned_vars(env.bootnames))
    if isinstance(env, BlsEnv):
        try:
            return any(n.startswith("ota-") for n in os.listdir(env.entries_dir))
        except FileNotFoundError:
            return False
        except OSError as e:
            raise BootEnvError(env.name, f"cannot list entries: {e.strerror}", path=str(env.entries_dir)) from e
    if isinstance(env, SimEnv):
        return env.path.exists()
    raise BootEnvError(env.name, "no initialisation rule for this backend")


def _initialise(env: BootEnv, initial: BootState, found: Probe) -> None:
    if isinstance(env, UBootEnv):
        env.create()  # our variables into a valid env, or new files; refuses storage without a valid copy
        _complete_redundancy(env, initial)
    elif isinstance(env, GrubEnv):
        try:
            block = read_block(env.path) if env.path.exists() else EnvBlock.fresh()
        except BootEnvError:
            block = EnvBlock.fresh()  # not a grubenv block (forced): GRUB could not read it either
        for name in owned_vars(env.bootnames):
            block.unset(name)  # leftovers of a damaged state must not survive
        write_block(env.path, block)
        env.store(initial)
    elif isinstance(env, BlsEnv):
        if found.found is Found.VALID:
            env.store(initial)  # renames only: the integrator's kernel lines stay
        else:
            env.create()
    else:
        env.create()


def _complete_redundancy(env: BootEnv, initial: BootState) -> None:
    """A redundant U-Boot pair holds the state in both copies: a later torn write
    of one copy then still leaves a valid one."""
    if not isinstance(env, UBootEnv):
        return
    cfg = env.storage.config()
    if not cfg.redundant:
        return
    copies = [uboot_env._read_copy(loc, True) for loc in cfg.copies]
    if not all(c.valid for c in copies) or copies[0].variables != copies[1].variables:
        env.store(initial)  # goes to the copy that is not current
