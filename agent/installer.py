"""Installing a bundle: connects the reader, the policy, the plan, the slot
writer, the bootloader and the state. The only module that writes slots.

Sequence (DESIGN.md invariants 1-5):
  head -> signature -> policy -> op table -> plan      (nothing touched yet)
  record the update as in flight (state: trial, not installed)
  mark target slot bad in the bootloader               (before the first byte)
  for each op: payload hash -> decode -> extent hash -> write
  fsync -> read back the whole image -> compare SHA-256
  set target primary with N tries -> record the slot's contents, trial installed
A power cut at any point leaves the booted slot primary and untouched; boot-check
on the next boot tells an interrupted install from a rollback by the trial record.
Any failure after the target was marked bad leaves it bad (never bootable with
partial contents); the booted slot is never opened for writing. Every outcome,
success or refusal, is recorded in the state and the outbox.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from agent import policy
from agent.crashpoint import crashpoint
from agent.daemon import Device
from agent.errors import InstallError, LockBusyError
from agent.events import Event, iso
from agent.plan import InstallPlan, make_plan
from agent.state import SlotRecord, Trial
from bundler.format.errors import HashMismatchError, OtaError
from bundler.format.ops import Op, produce
from bundler.format.reader import BundleReader, Readable
from bundler.format.signing import verify
from hw.bootloader.model import SlotBootState
from hw.slot import SlotWriter, read_back_sha256, slot_size

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    txn: str
    bundle_version: str
    slot: str
    security_version: int


def install(
    device: Device, stream: Readable, *, progress: ProgressFn | None = None, allow_downgrade: bool = False
) -> InstallOutcome:
    try:
        with device.store.lock():
            return _install(device, stream, progress=progress, allow_downgrade=allow_downgrade)
    except LockBusyError as e:
        # Another install owns state.json: report through the append-only outbox only.
        device.events.emit(Event("install", "failed", str(e)))
        raise


def _install(device: Device, stream: Readable, *, progress: ProgressFn | None, allow_downgrade: bool) -> InstallOutcome:
    txn = uuid.uuid4().hex[:12]
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
        reader = BundleReader(stream)
        bundle = verify(reader.read_head(), device.keyring())
        version = bundle.manifest.bundle_version
        state = device.store.load()
        policy.check(
            bundle,
            compatible=device.config.compatible,
            security_floor=state.committed_security_version,
            now=device.clock(),
            allow_downgrade=allow_downgrade,
        )
        ops = reader.read_op_table(bundle)
        capacity = {(s.slot_class, s.bootname): slot_size(s.path, s.bootname) for s in device.config.slots}
        plan = make_plan(bundle, device.config.slots, booted, capacity)
        target = plan.target
        device.events.emit(Event("install", "started", "bundle verified", txn, version, target))
        m = bundle.manifest
        trial = Trial(target, txn, m.bundle_version, m.security_version, m.images[0].sha256)
        _write(device, reader, ops, plan, booted, trial=trial, progress=progress)
        device.bootloader.set_primary(target, device.config.tries)
        crashpoint("after-set-primary")
        state = device.store.load().with_slot(
            target, SlotRecord(m.bundle_version, trial.sha256, m.security_version, iso(device.clock()))
        )
        state = replace(state, trial=replace(trial, installed=True))
    except OtaError as e:
        state = device.store.load()
        if state.trial is not None and state.trial.txn == txn:
            state = replace(state, trial=None)  # reported here, not as an interrupted install
        device.record(Event("install", "failed", str(e), txn, version, target), state)
        raise
    reason = f"installed; slot {target} will be tried on next boot ({device.config.tries} tries)"
    device.record(Event("install", "ok", reason, txn, m.bundle_version, target), state)
    return InstallOutcome(txn, m.bundle_version, target, m.security_version)


def _write(
    device: Device,
    reader: BundleReader,
    ops: Sequence[Op],
    plan: InstallPlan,
    booted: str,
    *,
    trial: Trial,
    progress: ProgressFn | None,
) -> None:
    target = plan.target
    # Record the update as in flight first, so a power cut anywhere below is
    # reported as an interrupted install on the next boot.
    state = device.store.load().with_slot(target, SlotRecord())
    if state.trial is not None and state.trial.slot != booted:
        log.info("replacing the pending update %s of slot %s", state.trial.bundle_version, state.trial.slot)
    device.store.save(replace(state, trial=trial))
    # Invariant 3: unbootable before the first byte is written.
    device.bootloader.mark_bad(target)
    crashpoint("after-mark-bad")
    total = sum(ip.image.size for ip in plan.images) * 2  # write + read-back
    done = 0
    writers = {ip.image.slot_class: SlotWriter(ip.slot.path, target, booted=booted) for ip in plan.images}

    def write(index: int, op: Op, extent: Future[bytes] | None) -> None:
        nonlocal done
        writer = writers[plan.image_for_op(index).image.slot_class]
        if extent is None:
            writer.write_zeros(op.dst_offset, op.dst_length)
        else:
            writer.write(op.dst_offset, extent.result())
        done += op.dst_length
        if progress:
            progress(done, total)

    # Pipeline: while op i is written, op i+1 is decoded and its extent hash
    # checked on a worker thread (zstd and hashlib release the GIL). Each extent
    # is still written only after its own checks passed; at most two are in memory.
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as decoder:
            pending: tuple[int, Op, Future[bytes] | None] | None = None
            for index, op, payload in reader.iter_payload(ops):
                extent = decoder.submit(produce, op, payload, index) if payload is not None else None
                if pending is not None:
                    write(*pending)
                    crashpoint("mid-payload")
                pending = (index, op, extent)
            if pending is not None:
                write(*pending)
            pending = extent = payload = None  # hold no payload or extent during the read-back
        for w in writers.values():
            w.sync()
        crashpoint("before-read-back")
    finally:
        for w in writers.values():
            w.close()
    for ip in plan.images:

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        actual = read_back_sha256(ip.slot.path, target, ip.image.size, tick)
        if actual != ip.image.sha256:
            raise HashMismatchError(f"slot {target} read-back", ip.image.sha256, actual)
