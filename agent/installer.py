"""Installing a bundle: connects the reader, the policy, the plan, the slot
writer, the bootloader and the state. With agent.slotstream (the pass over the
payload into the slots, which this module calls), the only code that writes slots.

Sequence (docs/architecture.md, invariants 1-5 and the crash model):
  head -> signature -> policy -> op table -> plan      (nothing touched yet)
  a pending update not yet booted: save it as cancelled, then mark its slot bad
  adaptive install of a full bundle with an embedded delta for what the booted
  slot's record names: that delta's ops and plan instead (agent.embedded)
  delta images: the booted slot of each class holds the base (its slot record
  names it, or the SHA-256 of its first base_size bytes; agent.deltabase)
                                                      (still nothing touched)
  mark target slot bad in the bootloader               (before the trial changes)
  record the update as in flight (state: trial, not installed)
  for each op (bundler.format.apply.run_op, several at once within a memory
  budget: agent.oprunner): payload hash -> source extents read from the booted
  slot or the target written so far, each hash-checked -> decode -> extent hash
  -> write
  read back from the medium while writing (hw.readback: each range once its
  writeback completed) -> fsync -> the rest read back -> compare SHA-256
  [etc] merge on: the device's /etc merged into the new slot (agent.etcmerge)
  set target primary with N tries -> record the slot's contents, trial installed
A bundle whose every image the booted slot already holds, or the other slot holds
as the pending update, is answered "already installed" after the policy check:
recorded, nothing written (`reinstall=True` writes it anyway).
`install_all_slots` is factory provisioning's use of the same path: every slot,
from one pass over the bundle, when no slot runs.
A power cut at any point leaves the booted slot primary and untouched; boot-check
on the next boot tells an interrupted install from a rollback by the trial record,
which never describes content its slot does not hold: whenever the slot may boot,
the record (or its absence) matches the slot; while it is being written, the slot
is bad. Crash points (agent.crashpoint) name each step for the power-cut tests.
Any failure after the target was marked bad leaves it bad (never bootable with
partial contents); the booted slot is never opened for writing. Every outcome,
success or refusal, is recorded in the state and the outbox.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from agent import adaptive, deltabase, embedded, etcmerge, policy
from agent.allocator import bound_allocator
from agent.bootcheck import pending_trial, trial_event
from agent.crashpoint import crashpoint
from agent.daemon import Device
from agent.errors import CanceledError, InstallError, LockBusyError
from agent.events import EtcConflict, Event, EventType, Result, iso
from agent.plan import InstallPlan, make_plan
from agent.slotstream import ProgressFn, stream_into
from agent.state import AgentState, SlotRecord, Trial
from bundler.format.errors import HashMismatchError, TrustError
from bundler.format.ops import Op, OpType
from bundler.format.reader import BundleReader, Readable
from bundler.format.signing import VerifiedBundle, verify
from hw.bootloader.chooser import booted_from_cmdline
from hw.bootloader.model import SlotBootState
from hw.slot import slot_size
from ota_common.errors import OtaError

log = logging.getLogger(__name__)




class InstallResult(enum.Enum):
    INSTALLED = "ok"
    ALREADY_INSTALLED = "already-installed"  # also the event's result value


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    txn: str
    bundle_version: str
    slot: str  # the slot written, or the slot that already holds the bundle
    security_version: int
    result: InstallResult = InstallResult.INSTALLED
    reason: str = ""
    downloaded: int | None = None  # bytes that crossed the network, when the source counts them
    etc_conflicts: tuple[EtcConflict, ...] = ()  # resolved by [etc] on_conflict (keep-local, take-new)


def install(
    device: Device,
    stream: Readable,
    *,
    progress: ProgressFn | None = None,
    allow_downgrade: bool = False,
    reinstall: bool = False,
    txn: str | None = None,
) -> InstallOutcome:
    """`txn` names the install in every event (the job id when a job runs it)."""
    txn = txn or uuid.uuid4().hex[:12]
    downloaded = _counter(stream)
    bound_allocator()
    try:
        with device.store.lock():
            return _install(
                device, stream, progress=progress, allow_downgrade=allow_downgrade, reinstall=reinstall, txn=txn
            )
    except LockBusyError as e:
        # Another install owns state.json: report through the append-only outbox only.
        device.events.emit(
            Event(event=EventType.INSTALL, result=Result.FAILED, reason=str(e), txn=txn, downloaded=downloaded())
        )
        raise


def _counter(stream: Readable) -> Callable[[], int | None]:
    """How many bytes the stream has taken from the network so far (None: it does not say)."""

    def count() -> int | None:
        value = getattr(stream, "downloaded", None)
        return value if isinstance(value, int) else None

    return count


def _install(
    device: Device,
    stream: Readable,
    *,
    progress: ProgressFn | None,
    allow_downgrade: bool,
    reinstall: bool,
    txn: str,
) -> InstallOutcome:
    version: str | None = None
    target: str | None = None
    try:
        booted = device.bootloader.booted_slot()
        booted_state = device.bootloader.state().slots[booted]
        if booted_state.state is SlotBootState.TRIAL:
            raise InstallError(
                f"booted slot {booted} is on trial and not committed yet; run boot-check (or mark-good/mark-bad) first"
            )
        if booted_state.state is SlotBootState.BAD:
            raise InstallError(f"booted slot {booted} is marked bad; reboot into the good slot before installing")
        state = device.store.load()  # under the state lock: nothing changes it until we do
        unfinished = state.trial
        if unfinished is not None and unfinished.slot == booted and not unfinished.failure:
            # Committed in the bootloader, not yet in the state (a cut after mark-good):
            # replacing this trial record would lose the commit's security floor.
            raise InstallError(
                f"the commit of slot {booted} (version {unfinished.bundle_version}) is not finished; "
                "run boot-check first"
            )
        reader = BundleReader(stream)
        head = reader.read_head()
        crashpoint("after-fetch-head")
        bundle = verify(head, device.keyring())
        version = bundle.manifest.bundle_version
        policy.check(
            bundle,
            compatible=device.config.compatible,
            security_floor=state.committed_security_version,
            now=device.clock(),
            allow_downgrade=allow_downgrade,
        )
        crashpoint("after-verify")
        ops = reader.read_op_table(bundle)
        capacity = {(s.slot_class, s.bootname): slot_size(s.path, s.bootname) for s in device.config.slots}
        plan = make_plan(bundle, device.config.slots, booted, capacity)
        target = plan.target
        m = bundle.manifest
        holder = None if reinstall else _already_installed(device, bundle, booted, state)
        if holder is not None:
            slot, reason = holder
            already = InstallResult.ALREADY_INSTALLED
            device.record(
                Event(
                    event=EventType.INSTALL,
                    result=Result.ALREADY_INSTALLED,
                    reason=reason,
                    txn=txn,
                    bundle_version=version,
                    slot=slot,
                )
            )
            return InstallOutcome(txn, m.bundle_version, slot, m.security_version, already, reason)
        device.events.emit(
            Event(
                event=EventType.INSTALL,
                result=Result.STARTED,
                reason="bundle verified",
                txn=txn,
                bundle_version=version,
                slot=target,
            )
        )
        crashpoint("after-started-reported")
        # A full bundle's embedded delta for what the booted slot holds: run it instead (agent.embedded).
        sub = embedded.substitute(device, stream, bundle=bundle, plan=plan, booted=booted, state=state,
                                  payload_start=reader.position)
        if sub is not None:
            ops, plan = sub.ops, sub.plan
        proofs = deltabase.check_bases(device, plan, booted, state)
        fetcher = _adaptive(device, stream, reader=reader, bundle=bundle, ops=ops, plan=plan, booted=booted,
                            embedded=sub is not None)
        images = {im.slot_class: im.sha256 for im in m.images}
        trial = Trial(target, txn, m.bundle_version, m.security_version, m.images[0].sha256, images=images)
        try:
            _write(device, reader, ops, plan, booted, trial=trial, progress=progress, fetcher=fetcher)
        except HashMismatchError as e:
            raise _base_changed(e, proofs, booted, target) from None
        etc = etcmerge.merge_for_install(device.config.etc, [(i.image.slot_class, i.slot.path) for i in plan.images])
        device.bootloader.set_primary(target, device.config.tries)
        crashpoint("after-set-primary")
        state = device.store.load().with_slot(
            target, SlotRecord(m.bundle_version, trial.sha256, m.security_version, iso(device.clock()), images)
        )
        state = replace(state, trial=replace(trial, installed=True))
    except OtaError as e:
        state = device.store.load()
        if state.trial is not None and state.trial.txn == txn:
            state = replace(state, trial=None)  # reported here, not as an interrupted install
        canceled = isinstance(e, CanceledError)
        try:
            device.record(
                Event(
                    event=EventType.INSTALL,
                    result=Result.CANCELLED if canceled else Result.FAILED,
                    reason=f"{e}; slot {target} stays unbootable" if canceled and target else str(e),
                    txn=txn,
                    bundle_version=version,
                    slot=target,
                    downloaded=_counter(stream)(),
                    conflicts=e.result.reported() if isinstance(e, etcmerge.EtcConflictError) else (),
                ),
                state,
            )
        except OtaError as unrecorded:
            # The disk that failed the install may fail its report too (full, read-only):
            # the cause is what the caller must see; the next boot reports it as interrupted.
            log.error("the failed install could not be recorded: %s", unrecorded)
        raise
    downloaded = _counter(stream)()
    reason = f"installed; slot {target} will be tried on next boot ({device.config.tries} tries)"
    reason += f"; {etc.summary()}" if etc else ""
    conflicts = etc.reported() if etc else ()
    device.record(
        Event(
            event=EventType.INSTALL,
            result=Result.OK,
            reason=reason,
            txn=txn,
            bundle_version=m.bundle_version,
            slot=target,
            downloaded=downloaded,
            conflicts=conflicts,
        ),
        state,
    )
    crashpoint("after-installed-recorded")
    return InstallOutcome(
        txn, m.bundle_version, target, m.security_version, reason=reason, downloaded=downloaded, etc_conflicts=conflicts
    )


class BaseExtentMismatch(HashMismatchError):
    """A base source extent that failed its hash, with what that means for the device."""

    def __init__(self, e: HashMismatchError, note: str) -> None:
        TrustError.__init__(self, f"{e}: {note}")
        self.what, self.expected, self.actual, self.op_index = e.what, e.expected, e.actual, e.op_index


def _base_changed(
    e: HashMismatchError, proofs: dict[str, deltabase.BaseProof], booted: str, target: str
) -> OtaError:
    """A base source extent that fails its hash after the base check passed: the
    booted slot does not hold what the signed bundle says is there (the slot
    changed, or the bundle is wrong). Says so, and what it leaves."""
    if not e.what.startswith("base source extent") or not proofs:
        return e
    since = (
        "it changed since its slot record named the base"
        if deltabase.BaseProof.RECORD in proofs.values()
        else "it changed during the install"
    )
    return BaseExtentMismatch(
        e, f"booted slot {booted} does not hold what this delta reads there ({since}, or the bundle is wrong); "
        f"slot {target} stays unbootable (install a full bundle)"
    )


def _already_installed(
    device: Device, bundle: VerifiedBundle, booted: str, state: AgentState
) -> tuple[str, str] | None:
    """The slot that already holds every image of the bundle, compared per slot class
    with the slot records: the booted slot, or the other slot holding it as the pending
    (not yet booted) update. Returns (slot, reason) or None."""
    wanted = {im.slot_class: im.sha256 for im in bundle.manifest.images}
    classes = {s.slot_class for s in device.config.slots}

    def holds(bootname: str) -> bool:
        record = state.slots.get(bootname)
        if record is None:
            return False
        images = record.images
        if images is None:
            # A record from before per-class hashes names one image: only unambiguous with one class.
            if record.sha256 is None or len(classes) != 1:
                return False
            images = {next(iter(classes)): record.sha256}
        return all(images.get(cls) == digest for cls, digest in wanted.items())

    version = bundle.manifest.bundle_version
    if holds(booted):
        held = state.slots[booted].version or "unknown"
        return booted, (
            f"already installed: the booted slot {booted} holds these images (version {held}); "
            "nothing written (--reinstall writes the other slot anyway)"
        )
    pending = pending_trial(state, device.bootloader.state(), booted)
    if pending is not None and holds(pending.slot):
        return pending.slot, (
            f"already installed: version {version} is pending in slot {pending.slot} and will be tried "
            "on next boot; nothing written (--reinstall writes it again)"
        )
    return None


def _adaptive(
    device: Device,
    stream: Readable,
    *,
    reader: BundleReader,
    bundle: VerifiedBundle,
    ops: Sequence[Op],
    plan: InstallPlan,
    booted: str,
    embedded: bool = False,
) -> adaptive.Fetcher | None:
    """For a stream that reads ranges (http(s), oci://): fetch only the payloads no
    local slot holds (agent.adaptive), within the [download] limits; None: stream on.
    Reads slots, writes nothing: a refusal here leaves every slot as it was."""
    ranges = adaptive.range_source(stream)
    if ranges is None:
        return None
    limits = device.config.download
    start, size = reader.position, reader.position + bundle.manifest.payload_length
    decision = None
    if limits.adaptive:
        decision = adaptive.prepare(ranges, ops, plan, slots=device.config.slots, booted=booted,
                                    payload_start=start, payload_length=bundle.manifest.payload_length,
                                    block_index=None if embedded else bundle.manifest.block_index,
                                    coalesce_gap=limits.coalesce_gap)
    if decision is None and embedded:  # the delta's ops cannot be streamed: the server stopped honouring Range
        raise InstallError(f"{ranges.name}: Range requests stopped working after the embedded delta was chosen; "
                           "nothing written")
    if decision is None:
        adaptive.check_limits(limits, size, size, "streaming the whole bundle")
        return None
    planned = ranges.downloaded + decision.fetch_bytes
    adaptive.check_limits(limits, planned, size, "adaptive download")
    log.info("%s", decision.summary())
    close = getattr(stream, "close", None)
    if close is not None:
        close()  # the plain stream is not read on: its connection goes

    def limit(extra: int) -> None:  # ops whose local blocks changed since the decision count too
        adaptive.check_limits(limits, planned + extra, size, "adaptive download, with the ops whose local "
                              "blocks changed since they were matched,", written=True)

    return adaptive.Fetcher(ranges, decision, start, limit)


def _cancel_pending(device: Device, booted: str, trial: Trial) -> None:
    """A pending update (installed or interrupted, not yet booted) is being replaced.
    The verdict is saved first: from then on boot-check never commits it, even if
    the firmware boots it before its slot is marked bad. Then its slot is made
    unbootable, and only after that may the trial record change (see `_write`)."""
    state = device.store.load()
    pending = state.trial
    if pending is None or pending.slot == booted:
        return
    log.info("replacing the pending update %s of slot %s", pending.bundle_version, pending.slot)
    if pending.cancelled is None:
        why = f"replaced by the install of version {trial.bundle_version} before slot {pending.slot} was tried"
        device.store.save(replace(state, trial=replace(pending, cancelled=why)))
        crashpoint("after-cancel-pending")
        device.events.emit(trial_event(pending, EventType.INSTALL, Result.CANCELLED, why))
    if pending.slot != trial.slot:
        device.bootloader.mark_bad(pending.slot)


def _write(
    device: Device,
    reader: BundleReader,
    ops: Sequence[Op],
    plan: InstallPlan,
    booted: str,
    *,
    trial: Trial,
    progress: ProgressFn | None,
    fetcher: adaptive.Fetcher | None = None,
) -> None:
    target = plan.target
    _cancel_pending(device, booted, trial)
    # Invariant 3: unbootable before the trial record names the new content and
    # before the first byte is written. A cut right here leaves the slot bad
    # with its old record, which still describes what it holds.
    device.bootloader.mark_bad(target)
    crashpoint("after-mark-bad")
    # Record the update as in flight, so a power cut anywhere below is reported
    # as an interrupted install on the next boot.
    state = device.store.load().with_slot(target, SlotRecord())
    device.store.save(replace(state, trial=trial))
    crashpoint("after-trial-saved")
    payloads = fetcher.iter_payload(ops) if fetcher is not None else None
    stream_into(device, reader, ops, (plan,), booted=booted, progress=progress, payloads=payloads)


def refuse_delta(bundle: VerifiedBundle, ops: Sequence[Op] = ()) -> None:
    """Factory provisioning writes blank slots: a delta has nothing to apply to."""
    for im in bundle.manifest.images:
        if im.base_sha256 is not None:
            raise InstallError(f"provisioning needs a full bundle: the {im.slot_class} image is a delta against "
                               f"base {im.base_sha256[:16]}...")
    for index, op in enumerate(ops):
        if op.type not in {OpType.ZERO, OpType.REPLACE}:
            raise InstallError(f"provisioning needs a full bundle: op {index} is {op.type.name}, which reads a base")


def install_all_slots(
    device: Device,
    stream: Readable | BundleReader,
    *,
    bundle: VerifiedBundle | None = None,
    progress: ProgressFn | None = None,
    txn: str | None = None,
) -> InstallOutcome:
    """Factory provisioning: the same checks as `install` (signature, policy, plan,
    per-op hashes, read-back), but the bundle goes into *every* configured slot in
    one pass, because none is running (the device runs a factory environment; a
    slot marker on the kernel command line is refused). Every slot is marked bad
    and its record cleared before its first byte is written; afterwards each record
    names the image and the slots stay bad: the caller (provisioning) initialises
    the bootloader. No trial is recorded and nothing is set primary. The caller
    holds the state lock. A caller that already read and verified the head passes
    the reader and `bundle` (provisioning checks the head before its first step)."""
    txn = txn or uuid.uuid4().hex[:12]
    version: str | None = None
    targets = device.config.bootnames
    try:
        try:
            booted: str | None = booted_from_cmdline(device.config.cmdline)
        except OtaError:
            booted = None  # no slot marker: a factory environment
        if booted is not None:
            raise InstallError(
                f"slot {booted} is booted ({device.config.cmdline}): provisioning writes every slot, so it runs "
                "from a factory environment (initramfs, USB or network boot), not from a slot"
            )
        state = device.store.load()
        reader = stream if isinstance(stream, BundleReader) else BundleReader(stream)
        if bundle is None:
            bundle = verify(reader.read_head(), device.keyring())
        version = bundle.manifest.bundle_version
        policy.check(bundle, compatible=device.config.compatible, security_floor=state.committed_security_version,
                     now=device.clock())
        ops = reader.read_op_table(bundle)
        refuse_delta(bundle, ops)
        capacity = {(s.slot_class, s.bootname): slot_size(s.path, s.bootname) for s in device.config.slots}
        plans = [make_plan(bundle, device.config.slots, None, capacity, target=t) for t in targets]
        m = bundle.manifest
        device.events.emit(Event(event=EventType.INSTALL, result=Result.STARTED, reason="bundle verified",
                                 txn=txn, bundle_version=version, slot=" ".join(targets)))
        for t in targets:
            device.bootloader.mark_bad(t)  # invariant 3, for every slot: none boots half-written
        crashpoint("after-mark-bad")
        state = device.store.load()
        for t in targets:
            state = state.with_slot(t, SlotRecord())
        device.store.save(replace(state, trial=None))
        crashpoint("after-trial-saved")
        stream_into(device, reader, ops, plans, booted=None, progress=progress)
        images = {im.slot_class: im.sha256 for im in m.images}
        state = device.store.load()
        for t in targets:
            state = state.with_slot(
                t, SlotRecord(m.bundle_version, m.images[0].sha256, m.security_version, iso(device.clock()), images)
            )
    except OtaError as e:
        device.record(Event(event=EventType.INSTALL, result=Result.FAILED, reason=str(e), txn=txn,
                            bundle_version=version, slot=" ".join(targets)))
        raise
    reason = f"installed into every slot ({', '.join(targets)})"
    device.record(Event(event=EventType.INSTALL, result=Result.OK, reason=reason, txn=txn,
                        bundle_version=m.bundle_version, slot=" ".join(targets)), state)
    return InstallOutcome(txn, m.bundle_version, " ".join(targets), m.security_version, reason=reason)
