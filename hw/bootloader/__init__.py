"""Bootloader backends: a closed registry, chosen by config name.

Every backend is a codec between `model.BootState` and one bootloader's own
storage, created by ``open_env(path, bootnames)``:

    sim    JSON file of the simulated bootloader
    uboot  U-Boot environment (fw_env.config), RAUC-compatible variables
    grub   GRUB environment block (grubenv), RAUC-compatible variables
    bls    Boot Loader Specification entries with boot counting (systemd-boot)
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from hw.bootloader.model import BootEnv
from hw.errors import BootEnvError

BACKENDS: dict[str, str] = {
    "sim": "hw.bootloader.simenv:SimEnv",
    "uboot": "hw.bootloader.uboot:UBootEnv",
    "grub": "hw.bootloader.grub:GrubEnv",
    "bls": "hw.bootloader.bls:BlsEnv",
}


def open_env(backend: str, path: Path, bootnames: Sequence[str]) -> BootEnv:
    try:
        target = BACKENDS[backend]
    except KeyError:
        raise BootEnvError(backend, f"unknown backend; choose one of {', '.join(BACKENDS)}") from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    env: BootEnv = cls(path, bootnames)
    return env
