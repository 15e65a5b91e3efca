"""Errors raised by the hardware layer.

    OtaError (bundler.format.errors)
    +-- HwError                 any hardware-side failure, message prefixed by the backend
        +-- BootEnvError        bootloader environment unreadable, invalid or not writable
        +-- SlotError           slot device/file cannot be opened, read or written
        +-- WatchdogError       watchdog device failure
"""

from __future__ import annotations

from ota_common.errors import OtaError


class HwError(OtaError):
    """A hardware-layer failure; the message names the backend and the object."""


class BootEnvError(HwError):
    """The bootloader environment could not be read, parsed or written."""

    def __init__(self, backend: str, message: str, *, path: str = "") -> None:
        where = f" ({path})" if path else ""
        super().__init__(f"{backend} backend{where}: {message}")
        self.backend = backend
        self.path = path


class SlotError(HwError):
    """A slot could not be opened, read or written."""

    def __init__(self, slot: str, message: str) -> None:
        super().__init__(f"slot {slot}: {message}")
        self.slot = slot


class WatchdogError(HwError):
    """The watchdog device failed."""
