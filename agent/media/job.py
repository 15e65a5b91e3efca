"""One visit of a stick, as one job: mount (or take the directory), scan,
select, install, report, unmount. `App.media` runs it inside the job queue, so
it runs in the daemon when one runs and every front end sees its progress.

Outcomes: `installed` (exit 0), `nothing-to-install` (exit 0: no bundle for
this device newer than what it runs, or the newest one already installed or
pending), `failed` (non-zero with the reason: the stick could not be mounted
or read, only broken or untrusted bundles on it, or the install failed). Every
outcome is queued in the outbox and, when the stick is writable, written back
onto it (`agent.media.report`). A failure after the target slot was marked
unbootable leaves it so (the installer's rule); the booted slot is never
touched, and inserting the stick again starts from the beginning.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bootcheck import pending_trial
from agent.daemon import Device
from agent.errors import CanceledError
from agent.events import iso
from agent.installer import InstallOutcome, InstallResult
from agent.jobs import JobContext
from agent.media import report
from agent.media.errors import MediaError
from agent.media.mount import Medium, medium, writable
from agent.media.scan import scan
from agent.media.select import Selection, select
from agent.media.source import MediaSource
from agent.sources import BundleSource
from agent.state import SlotRecord
from ota_common.errors import OtaError
from ota_common.media import Ignored, Outcome, Receipt

log = logging.getLogger(__name__)

Installer = Callable[[JobContext, BundleSource], InstallOutcome]
PHASE_SCAN = "reading bundle heads"


@dataclass(frozen=True, slots=True)
class MediaOutcome:
    receipt: Receipt
    written_to: str | None  # the receipt's path on the stick, when written back
    not_written: str  # why it was not

    def to_json(self) -> dict[str, Any]:
        return {**self.receipt.to_json(), "receipt_on_stick": self.written_to, "receipt_not_written": self.not_written
                or None}

    def text(self) -> str:
        r = self.receipt
        if r.result is Outcome.INSTALLED:
            lines = [f"installed version {r.new_version} into slot {r.slot} from {r.bundle}; reboot to try it"]
        else:
            lines = [r.reason]
        lines += [f"ignored {i.file}: {i.reason}" for i in r.ignored]
        where = f"written to the stick as {self.written_to}" if self.written_to else f"not written to the stick: " \
            f"{self.not_written}"
        lines.append(f"receipt queued for the fleet; {where}")
        return "\n".join(lines)


def device_id(device: Device) -> str:
    mqtt = device.config.mqtt
    return mqtt.device_id if mqtt is not None else socket.gethostname()


def run(device: Device, ctx: JobContext, path: Path, install: Installer) -> MediaOutcome:
    """The visit of the medium at `path`; raises MediaError (or CanceledError)
    after the receipt was queued when it failed."""
    if not path.is_absolute():  # from a socket or a broker: no working directory is shared
        raise MediaError(f"media: {path} is not an absolute path")
    booted = device.bootloader.booted_slot()
    installed = device.store.load().slots.get(booted)
    old = installed.version if installed is not None else None
    base: dict[str, Any] = {"device": device_id(device), "txn": ctx.job_id, "old_version": old}
    try:
        slots = [(s.bootname, s.path) for s in device.config.slots]
        with medium(path, device.config.state_dir / "media", slots) as m:
            receipt, error = _visit(device, ctx, m, install, base=base, installed=installed)
            written, why = _write_back(device, m, receipt)
    except MediaError as e:  # not mounted or not readable: the outbox has the receipt
        receipt = Receipt(result=Outcome.FAILED, reason=str(e), time=iso(device.clock()), **base)
        report.queue(device.events, receipt)
        raise
    if error is not None:
        raise error
    return MediaOutcome(receipt, written, why)


def _visit(
    device: Device, ctx: JobContext, m: Medium, install: Installer, *, base: dict[str, Any],
    installed: SlotRecord | None,
) -> tuple[Receipt, OtaError | None]:
    found = scan(m.root_fd)
    log.info("%s: %d bundle(s) found, %d entries looked at", m.name, len(found.candidates), found.entries)
    state = device.store.load()
    pending = pending_trial(state, device.bootloader.state(), device.bootloader.booted_slot())
    selection = Selection()
    error: OtaError | None = None
    new = slot = bundle = None
    try:
        selection = select(
            m.root_fd, found.candidates, keyring=device.keyring(), compatible=device.config.compatible,
            security_floor=state.committed_security_version, now=device.clock(), installed=installed,
            pending=pending,
            tick=lambda i, n: ctx.progress(PHASE_SCAN, i, n),
        )
        chosen = selection.chosen
        if chosen is None:
            if selection.invalid:
                result, reason = Outcome.FAILED, f"no installable bundle on {m.name}: " \
                    f"{selection.invalid} broken or untrusted"
                error = MediaError(reason)
            elif found.candidates:
                also = f" or the pending {pending.bundle_version}" if pending is not None else ""
                result, reason = Outcome.NOTHING, f"nothing to install: no bundle on {m.name} is newer than " \
                    f"version {base['old_version']}{also} for this device"
            else:
                result, reason = Outcome.NOTHING, f"nothing to install: no bundles on {m.name}"
        else:
            bundle = chosen.path
            log.info("%s: installing %s (version %s)", m.name, bundle, chosen.bundle.manifest.bundle_version)
            try:
                outcome = install(ctx, MediaSource(chosen, m.name, device.config.download))
            except OtaError as e:
                result, reason, error = Outcome.FAILED, str(e), e
                if isinstance(e, CanceledError):
                    reason = f"cancelled: {e}"
            else:
                new, slot = outcome.bundle_version, outcome.slot
                if outcome.result is InstallResult.ALREADY_INSTALLED:
                    result, reason = Outcome.NOTHING, f"nothing to install: {outcome.reason}"
                else:
                    result, reason = Outcome.INSTALLED, outcome.reason
            if error is not None:
                new = chosen.bundle.manifest.bundle_version
    finally:
        selection.close()  # every bundle descriptor closed before any write-back
    ignored: list[Ignored] = [*found.skipped, *selection.ignored]
    receipt = Receipt(result=result, reason=reason, time=iso(device.clock()), new_version=new, slot=slot,
                      bundle=bundle, ignored=tuple(ignored), **base)
    report.queue(device.events, receipt)
    return receipt, error


def _write_back(device: Device, m: Medium, receipt: Receipt) -> tuple[str | None, str]:
    with writable(m) as (root, why):
        if root is None:
            log.info("receipt not written to %s: %s", m.name, why)
            return None, why
        try:
            where = report.write_back(root, receipt)
        except OSError as e:
            failed = f"writing it failed: {report.describe_error(e)}"
            log.warning("receipt not written to %s: %s", m.name, failed)
            return None, failed
    log.info("receipt written to %s: %s", m.name, where)
    return where, ""
