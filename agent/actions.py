"""The application layer: every action a front end can ask of the agent, each
returning a result value. The CLI, the local API, MQTT jobs and the serial
console are thin adapters over `agent.commands`, which calls these.

Owns what each action means in terms of the core (installer, boot-check,
marking, status) and the order of its steps; owns no parsing and no rendering.
State-changing actions run as jobs of the one `JobQueue` (so a second one while
an install runs is answered "busy"), and take the state lock themselves, so a
second process is refused too.

Actions:
  install(source)      stream a bundle into the inactive slot (cancelable between ops); on a device
                       whose provisioning waits for its image: that image, into every slot
  mark(slot, verdict)  the operator's good/bad verdict (agent.marking)
  rollback()           make the other slot, whose content is known, the one to try next
  reboot()             reboot the device through the configured rebooter
  boot_check()         assess the booted slot after a boot (agent.bootcheck)
  media(path)          install the newest bundle from a USB stick or directory (agent.media)
  status()             the device's status value
  cancel(job)          ask the running job to stop at its next safe point
  identity()           the device identity: key made on the device if missing, CSR, certificate
  provision(bundle)    factory provisioning (agent.provision.run), resumable
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.bootcheck import BootCheckOutcome, boot_check
from agent.crashpoint import crashpoint
from agent.daemon import Device
from agent.errors import CanceledError, LockBusyError, MarkError
from agent.events import Event, EventType, Result, iso
from agent.installer import InstallOutcome, install
from agent.jobs import JobContext, JobQueue, JobView
from agent.marking import MarkOutcome, Verdict, mark, unknown_content
from agent.media import job as media_job
from agent.provision import identity as identity_mod
from agent.provision import record as provision_record
from agent.provision.run import ProvisionOutcome, ProvisionRequest, pin_device_id, provision, waits_for_image
from agent.slotstream import Phase
from agent.sources import BundleSource, source_for
from agent.state import Trial
from agent.status import DeviceStatus, status
from hw.bootloader.model import SlotBootState
from hw.power import reboot as run_reboot_command
from ota_common.errors import OtaError

log = logging.getLogger(__name__)

Rebooter = Callable[[], None]


@dataclass(frozen=True, slots=True)
class RollbackOutcome:
    slot: str  # the slot the next boot tries
    bundle_version: str | None
    reason: str
    rebooting: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "bundle_version": self.bundle_version,
            "reason": self.reason,
            "rebooting": self.rebooting,
        }


@dataclass(frozen=True, slots=True)
class BootCheckResult:
    check: BootCheckOutcome
    rebooting: bool  # boot-check asked for a reboot and it is being done

    def to_json(self) -> dict[str, Any]:
        o = self.check
        return {
            "outcome": o.outcome.value,
            "slot": o.slot,
            "reason": o.reason,
            "booted_good": o.booted_good,
            "reboot_needed": o.reboot,
            "rebooting": self.rebooting,
        }

    def text(self) -> str:
        line = f"boot-check: {self.check.outcome.value}: {self.check.reason}"
        if self.check.reboot and not self.rebooting:
            line += "\nboot-check: reboot needed (skipped: --no-reboot)"
        return line

    @property
    def ok(self) -> bool:
        """Non-zero exit whenever the booted slot is not good: keeps boot-complete.target
        (and systemd-bless-boot's "good") from being reached."""
        return self.check.booted_good and not self.check.reboot


@dataclass(frozen=True, slots=True)
class RebootOutcome:
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason}


def command_rebooter(device: Device) -> Rebooter:
    """The real rebooter: the configured `reboot_command`."""
    return lambda: run_reboot_command(device.config.reboot_command)


class App:
    """The agent's actions over one device. `queue` is shared by every front end."""

    def __init__(self, device: Device, *, rebooter: Rebooter | None = None, queue: JobQueue | None = None) -> None:
        self.device = device
        self.rebooter = rebooter or command_rebooter(device)
        self.queue = queue or JobQueue()

    # --- read-only -------------------------------------------------------------

    def status(self) -> DeviceStatus:
        running = self.queue.running()
        return replace(status(self.device), job=running.to_json() if running else None)

    def job(self, job_id: str) -> JobView | None:
        return self.queue.get(job_id)

    def cancel(self, job_id: str | None = None) -> JobView:
        return self.queue.cancel(job_id)

    # --- state-changing (each runs inside a job) -------------------------------

    def install(
        self, ctx: JobContext, source: str | BundleSource, *, allow_downgrade: bool = False, reinstall: bool = False
    ) -> InstallOutcome:
        """Install from `source`: a spec for `source_for` (path, `-`, URL), or a source
        object a front end made (an MQTT stream), which the same path streams into the slot."""
        device = self.device
        if waits_for_image(device):
            return self._provision_image(ctx, source)
        try:
            if isinstance(source, str):
                source = source_for(source, device.config.download)
            source.cancel_with(ctx.cancel_event)  # a cancel ends a retry backoff at once
            stream = source.open()
        except OtaError as e:
            # No bundle byte arrived, but the attempt still failed: report it like any other.
            result = Result.CANCELLED if isinstance(e, CanceledError) else Result.FAILED  # in a retry backoff
            device.record(Event(event=EventType.INSTALL, result=result, reason=str(e), txn=ctx.job_id, downloaded=0))
            raise

        def progress(phase: Phase, done: int, total: int) -> None:
            ctx.progress(phase.value, done, total)  # raises CanceledError at this safe point

        with stream:
            return install(
                device,
                stream,
                progress=progress,
                allow_downgrade=allow_downgrade,
                reinstall=reinstall,
                txn=ctx.job_id,
            )

    def media(self, ctx: JobContext, path: str) -> media_job.MediaOutcome:
        """Mount (or take) the medium at `path`, choose its newest bundle for this
        device by the signed manifests, install it like any other source, report."""
        return media_job.run(self.device, ctx, Path(path), self.install)
    def _provision_image(self, ctx: JobContext, source: str | BundleSource) -> InstallOutcome:
        """`install` on a device whose provisioning waits for its image (a factory
        environment: no slot runs): the bundle is that image, for every slot, and the
        provisioning goes on to its end (docs/factory.md). Any front end's install
        (a console upload, a file) does it; the same checks apply."""
        if isinstance(source, str):
            source = source_for(source, self.device.config.download)
        outcome = self.provision(ctx, ProvisionRequest(), source)
        slots = " ".join(self.device.config.bootnames)
        reason = f"provisioned: image {outcome.bundle_version} in every slot ({slots})"
        return InstallOutcome(ctx.job_id, str(outcome.bundle_version), slots, outcome.security_version or 0,
                              reason=reason)

    def provision(
        self, ctx: JobContext, request: ProvisionRequest, source: BundleSource | None = None
    ) -> ProvisionOutcome:
        """Factory provisioning; each step is reported as job progress. `source`: the
        bundle as a stream a front end made (a console upload), else `request.bundle`."""
        return provision(self.device, request, source=source, progress=ctx.progress, txn=ctx.job_id)

    def identity(
        self, ctx: JobContext, *, device_id: str | None = None, cert: str | None = None, ca_cert: str | None = None
    ) -> identity_mod.Identity:
        """The identity a station needs before signing: made (key, CSR) if missing; with
        `cert`, the factory CA's certificate for it is checked and installed."""
        device = self.device
        pcfg = device.config.provision
        with device.store.lock():
            rec = pin_device_id(pcfg.dir, provision_record.load(pcfg.dir), device_id)
            ident = identity_mod.ensure_identity(pcfg.dir, key_type=pcfg.key_type, device_id=device_id,
                                                 known_id=rec.info.get("device_id"), cert=cert, ca_cert=ca_cert,
                                                 now=device.clock())
            rec = rec.with_step("identity", iso(device.clock()), device_id=ident.device_id,
                                public_key_sha256=ident.fingerprint, key_type=ident.key_type)
            provision_record.save(pcfg.dir, rec)  # a later provision keeps this id
            return ident

    def mark(self, ctx: JobContext, slot: str, verdict: Verdict, *, force: bool = False) -> MarkOutcome:
        return mark(self.device, slot, verdict, force=force)

    def boot_check(self, ctx: JobContext, *, reboot: bool = True) -> BootCheckResult:
        outcome = boot_check(self.device)
        rebooting = outcome.reboot and reboot
        if rebooting:
            crashpoint("before-reboot")
            self.rebooter()
        return BootCheckResult(outcome, rebooting)

    def reboot(self, ctx: JobContext) -> RebootOutcome:
        self.device.record(Event(event=EventType.REBOOT, result=Result.OK, reason="reboot requested"))
        self.rebooter()
        return RebootOutcome("rebooting")

    def rollback(self, ctx: JobContext, *, reboot: bool = True, allow_downgrade: bool = False) -> RollbackOutcome:
        """Make the other slot the one the next boot tries (a trial: it must pass its
        health checks and commit, or the device comes back here). Refused when its
        content is not known complete and verified, when it is marked bad, or when it
        holds a security version below the committed floor (unless allow_downgrade)."""
        device = self.device
        try:
            with device.store.lock():
                outcome = self._rollback(ctx, allow_downgrade=allow_downgrade, reboot=reboot)
        except LockBusyError:
            raise LockBusyError("busy: another ota-agent command holds the state lock; rollback not done") from None
        if outcome.rebooting:
            self.rebooter()
        return outcome

    def _rollback(self, ctx: JobContext, *, allow_downgrade: bool, reboot: bool) -> RollbackOutcome:
        device = self.device
        bl = device.bootloader
        booted = bl.booted_slot()
        boot = bl.state()
        if boot.slots[booted].state is not SlotBootState.GOOD:
            raise MarkError(f"booted slot {booted} is not committed; run boot-check (or mark-good/mark-bad) first")
        others = [b for b in device.config.bootnames if b != booted]
        state = device.store.load()
        target = others[0]
        why = unknown_content(state, target)
        if why is not None:
            raise MarkError(f"cannot roll back to slot {target}: {why}")
        if boot.slots[target].state is SlotBootState.BAD:
            raise MarkError(
                f"cannot roll back to slot {target}: it is marked bad (it failed or was replaced); "
                f"mark-good {target} first if you know it works"
            )
        record = state.slots[target]
        floor = state.committed_security_version
        if record.security_version is not None and record.security_version < floor and not allow_downgrade:
            raise MarkError(
                f"cannot roll back to slot {target}: it holds security version {record.security_version}, "
                f"below the committed {floor} (allow_downgrade overrides)"
            )
        # The bootloader first: a cut after it boots the target as a trial, which
        # boot-check assesses (and commits without a record, keeping the floor).
        bl.set_primary(target, device.config.tries)
        trial = Trial(
            slot=target,
            txn=ctx.job_id,
            bundle_version=record.version or "unknown",
            security_version=record.security_version or 0,
            sha256=record.sha256,
            installed=True,
            images=record.images,
        )
        reason = f"rollback to slot {target} (version {record.version}); it is tried on the next boot"
        device.record(
            Event(
                event=EventType.ROLLBACK,
                result=Result.REQUESTED,
                reason=reason,
                txn=ctx.job_id,
                bundle_version=record.version,
                slot=target,
            ),
            replace(state, trial=trial),
        )
        return RollbackOutcome(target, record.version, reason, rebooting=reboot)
