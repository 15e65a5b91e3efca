"""Errors raised by the agent (the format and hardware trees live in
bundler.format.errors and hw.errors; all share the root `OtaError`).

    OtaError
    +-- ConfigError           config file unreadable, unknown key, wrong type, out of range
    +-- PolicyError           a genuine bundle this device refuses
    |   +-- IncompatibleError compatible string differs from the device's
    |   +-- DowngradeError    security version below the committed floor
    |   +-- ExpiredError      the bundle's expiry time has passed
    +-- PlanError             the bundle's images do not fit this device's slots
    +-- SourceError           fetching bytes failed (transient: may be retried)
    +-- InstallError          refusing or aborting an install for a local reason
    |   +-- LockBusyError     another install, boot-check or mark holds the state lock
    +-- MarkError             an operator's mark-good/mark-bad refused (unknown slot, unknown content)
    +-- BusyError             a state-changing job while another runs (names the running job)
    +-- CanceledError         the running job was canceled at a safe point
"""

from __future__ import annotations

from ota_common.errors import OtaError


class ConfigError(OtaError):
    def __init__(self, path: str, where: str, message: str) -> None:
        super().__init__(f"{path}: {where}: {message}" if where else f"{path}: {message}")
        self.path = path
        self.where = where


class PolicyError(OtaError):
    """A correctly signed bundle that this device must not install."""


class IncompatibleError(PolicyError):
    def __init__(self, bundle: str, device: str) -> None:
        super().__init__(f"bundle is for compatible {bundle!r}, this device is {device!r}")
        self.bundle = bundle
        self.device = device


class DowngradeError(PolicyError):
    def __init__(self, bundle: int, floor: int) -> None:
        super().__init__(f"bundle security version {bundle} is below the committed security version {floor}")
        self.bundle = bundle
        self.floor = floor


class ExpiredError(PolicyError):
    def __init__(self, expires: str, now: str) -> None:
        super().__init__(f"bundle expired at {expires} (now {now})")
        self.expires = expires


class PlanError(OtaError):
    """The bundle cannot be mapped onto this device's slots."""


class SourceError(OtaError):
    """Fetching the bundle failed. `transient` errors may be retried."""

    def __init__(self, source: str, message: str, *, transient: bool = True, status_code: int | None = None) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.transient = transient
        self.status_code = status_code


class InstallError(OtaError):
    """An install refused or aborted for a local reason (busy, slot too small, ...)."""


class LockBusyError(InstallError):
    """Another agent process holds the state lock."""


class MarkError(OtaError):
    """mark-good / mark-bad refused: an unknown slot, or content not known to be complete."""


class BusyError(OtaError):
    """A state-changing command arrived while a job runs; carries the running job's id."""

    def __init__(self, job_id: str, command: str) -> None:
        super().__init__(f"busy: job {job_id} ({command}) is running; try again when it has finished")
        self.job_id = job_id
        self.command = command


class CanceledError(InstallError):
    """The running job was asked to stop and stopped at a safe point."""
