"""The bootloader interface the agent uses: RAUC's bootchooser verbs
(booted slot, primary, set primary with N tries, mark good, mark bad, state)
on top of any `BootEnv` codec and the shared rules in `model.py`.

The booted slot is read from the kernel command line (``ota.slot=B``, or RAUC's
``rauc.slot=B`` for devices migrating from RAUC), which every shipped boot
script sets; the simulator writes the same line to a file.
"""

from __future__ import annotations

from pathlib import Path

from hw.bootloader import model
from hw.bootloader.model import BootEnv, BootState
from hw.errors import BootEnvError
from ota_common.fsutil import read_regular

CMDLINE_KEYS = ("ota.slot", "rauc.slot")
MAX_CMDLINE = 64 * 1024


def booted_from_cmdline(path: Path) -> str:
    try:
        text = read_regular(path, MAX_CMDLINE).decode("utf-8", "replace")
    except OSError as e:
        raise BootEnvError("cmdline", f"cannot read: {e.strerror}", path=str(path)) from e
    for word in text.split():
        key, _, value = word.partition("=")
        if key in CMDLINE_KEYS and value:
            return value
    keys = " or ".join(k + "=" for k in CMDLINE_KEYS)
    raise BootEnvError("cmdline", f"no {keys} on the kernel command line", path=str(path))


class Bootloader:
    def __init__(self, env: BootEnv, cmdline: Path) -> None:
        self.env = env
        self.cmdline = cmdline

    @property
    def name(self) -> str:
        return self.env.name

    def booted_slot(self) -> str:
        booted = booted_from_cmdline(self.cmdline)
        self._check(booted)
        return booted

    def state(self) -> BootState:
        return self.env.load()

    def primary_slot(self) -> str:
        return model.next_boot(self.env.load())

    def set_primary(self, bootname: str, tries: int) -> None:
        self._store(model.set_primary(self.env.load(), bootname, tries))

    def mark_good(self, bootname: str) -> None:
        self._store(model.mark_good(self.env.load(), bootname))

    def mark_bad(self, bootname: str) -> None:
        self._store(model.mark_bad(self.env.load(), bootname))

    def refresh(self) -> bool:
        """Rewrite the environment in its canonical form if a boot script other than
        ours changed it (a device still booting RAUC's stock U-Boot script counts a
        committed slot down on every boot). Returns whether it wrote anything."""
        needs = getattr(self.env, "needs_refresh", None)
        if needs is None or not needs():
            return False
        self._store(self.env.load())
        return True

    def _store(self, state: BootState) -> None:
        self.env.store(state)
        # Read back: a write that "succeeded" but did not stick is a loud error.
        if self.env.load() != state:
            raise BootEnvError(self.env.name, "state read back after write differs from what was written")

    def _check(self, bootname: str) -> None:
        slots = self.env.load().slots
        if bootname not in slots:
            known = ", ".join(slots)
            raise BootEnvError("cmdline", f"booted slot {bootname!r} is not one of {known}", path=str(self.cmdline))
