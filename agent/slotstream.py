"""Writing a bundle's ops into the planned slots and reading them back: the one
pass over the payload that every install makes (`agent.installer`: an update into
the inactive slot; factory provisioning: every slot at once).

Each op is produced on a few worker threads (agent.oprunner: payload hash, source
extents read from the booted slot or the target written so far, each
hash-checked, decode, extent hash) and written by the slot writers; the read-back
follows the writes (hw.readback: a range is read from the medium once it is
written and its writeback completed), so after the last op and the fsync only
its tail is left, and each slot's image is compared with its SHA-256. The caller
marks the slots bad before and records them after; nothing here touches the
bootloader or the state.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence

from agent import adaptive, deltabase
from agent.crashpoint import crashpoint
from agent.daemon import Device
from agent.errors import InstallError
from agent.oprunner import OpRunner
from agent.plan import InstallPlan
from bundler.format.apply import ExtentSource, FileSource, NoSource, hints, run_op
from bundler.format.errors import HashMismatchError
from bundler.format.ops import Op
from bundler.format.reader import BundleReader
from hw.readback import ReadBackCheck
from hw.slot import SlotWriter


class Phase(enum.Enum):
    """What an install's progress counts: each phase runs from 0 to the images' total size."""

    WRITE = "writing"
    VERIFY = "verifying read-back"


ProgressFn = Callable[[Phase, int, int], None]  # (phase, bytes done, bytes total)


def stream_into(
    device: Device,
    reader: BundleReader,
    ops: Sequence[Op],
    plans: Sequence[InstallPlan],
    *,
    booted: str | None,
    progress: ProgressFn | None,
    payloads: Iterator[tuple[int, Op, adaptive.Payload]] | None = None,
) -> None:
    """Every op of the bundle, each checked once, into every planned slot; each slot
    read back from the medium and compared with its image's SHA-256. The read-back
    follows the writes (a range is read once it is written and its writeback
    completed: hw.readback), so after the last op and the fsync only its tail is
    left. `booted` None: no slot is running (factory provisioning writes them all)."""
    total = sum(ip.image.size for ip in plans[0].images)  # write phase: one pass over the stream
    written = 0
    booted_paths = [s.path for s in device.config.slots if s.bootname == booted]
    writers: dict[tuple[str, str], SlotWriter] = {}
    checks: dict[tuple[str, str], ReadBackCheck] = {}
    sources: dict[str, ExtentSource] = {}
    files: list[FileSource] = []

    def produce(index: int, op: Op, payload: adaptive.Payload) -> bytes | bytearray | None:
        if isinstance(payload, adaptive.LocalExtent):  # held by a slot: read and hash-checked again
            return payload.produce(op, index)
        cls = plans[0].image_for_op(index).image.slot_class
        return run_op(op, payload, index, sources[cls], bases[cls])

    def write(index: int, op: Op, data: bytes | bytearray | None) -> None:
        slot_class = plans[0].image_for_op(index).image.slot_class
        for plan in plans:
            writer = writers[(plan.target, slot_class)]
            if data is None:
                writer.write_zeros(op.dst_offset, op.dst_length)
            else:
                writer.write(op.dst_offset, data)
            checks[(plan.target, slot_class)].written(op.dst_offset, op.dst_length)

    def done(index: int, op: Op) -> None:
        nonlocal written
        written += op.dst_length
        crashpoint("mid-payload")
        if progress:
            progress(Phase.WRITE, written, total)

    def reads_target(index: int, op: Op, payload: adaptive.Payload) -> list[tuple[int, int]] | None:
        return [] if isinstance(payload, adaptive.LocalExtent) else hints(op, payload)[1]

    def advise(index: int, op: Op, payload: adaptive.Payload) -> None:
        source = sources[plans[0].image_for_op(index).image.slot_class]
        if isinstance(source, FileSource) and not isinstance(payload, adaptive.LocalExtent):
            for origin, offset, length in hints(op, payload)[0]:
                source.advise(origin, offset, length)

    # Ops run on a few worker threads, each produced (payload hash, source extents
    # read from the booted slot or the target written so far, each hash-checked,
    # decode, extent hash) and then written; within one memory budget, and an op
    # that reads the target only after the earlier ops writing what it reads
    # (agent.oprunner).
    try:
        for plan in plans:
            for ip in plan.images:  # inside the try: a refusal of the second closes the first
                cls = ip.image.slot_class
                writers[(plan.target, cls)] = device.open_slot(
                    ip.slot.path, plan.target, booted=booted or "", booted_paths=booted_paths
                )
                checks[(plan.target, cls)] = device.read_back(ip.slot.path, plan.target, ip.image.size)
                if ip.image.base_sha256 is None:
                    sources[cls] = NoSource()
                elif booted is None or len(plans) > 1:  # refuse_delta stops this before anything is written
                    raise InstallError(f"a delta for {cls} needs a running base slot")
                else:
                    files.append(FileSource(deltabase.booted_slot_of(device, cls, booted), ip.slot.path))
                    sources[cls] = files[-1]
        bases = {ip.image.slot_class: ip.image.base_size or 0 for ip in plans[0].images}
        items: Iterator[tuple[int, Op, adaptive.Payload]] = payloads or reader.iter_payload(ops)
        runner: OpRunner[adaptive.Payload] = OpRunner(
            produce=produce, write=write, done=done, reads_target=reads_target, advise=advise
        )
        runner.run(items, ops)
        del items, runner
        crashpoint("before-sync")
        for w in writers.values():
            w.sync()
        crashpoint("before-read-back")
        checked = 0
        total *= len(plans)
        for plan in plans:
            for ip in plan.images:

                def tick(n: int) -> None:
                    nonlocal checked
                    checked += n
                    if progress:
                        progress(Phase.VERIFY, checked, total)

                actual = checks[(plan.target, ip.image.slot_class)].finish(tick)
                if actual != ip.image.sha256:
                    raise HashMismatchError(f"slot {plan.target} read-back", ip.image.sha256, actual)
    finally:
        for c in checks.values():
            c.close()
        for f in files:
            f.close()
        for w in writers.values():
            w.close()
    crashpoint("after-read-back")
