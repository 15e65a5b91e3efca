"""Adaptive download of a full bundle that carries embedded deltas
(docs/bundle-format.md section 7.3, docs/adaptive.md): when the booted slot's
record of every image's class names the base of one of them, the install runs
those deltas instead of the full images, fetching by Range only their op
tables and payloads.

Owns choosing the embedded delta per image (the slot record, as
agent.deltabase reads it, names its base; without a record the device falls
back to block matching, it never hashes a slot to choose), fetching its op
table by Range and checking it (pinned SHA-256, the structure of a delta image
of that image against that base; a damaged one is fetched again up to
REFETCHES times, then refused), and putting together the op table and the plan
the installer runs instead: the chosen tables one after the other, their
payload offsets moved into the payload region, each image entry naming its
base. From there the install is a delta install: agent.deltabase checks the
bases, agent.adaptive fetches the payloads (and max_download_* apply), every
source extent, payload and produced extent is hash-checked, the slot is read
back against the image's SHA-256 from the signed manifest.

Memory, before the first write: the full op table (T) and one buffer holding
the chosen embedded tables, each fetched straight into its place, checked and
rebased there (no copies); the full table is released when the combined one
replaces it, so the payload phase holds the embedded tables (at most
MAX_EMBEDDED_OPS records together) where a delta bundle holds its op table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from agent import adaptive, deltabase
from agent.daemon import Device
from agent.plan import ImagePlan, InstallPlan
from agent.ranged import ResumableSource
from agent.state import AgentState
from bundler.format import embedded as format_embedded
from bundler.format.errors import FormatError, HashMismatchError
from bundler.format.header import OP_RECORD_SIZE
from bundler.format.manifest import EmbeddedDeltaRef
from bundler.format.ops import OpTable, unpack_table
from bundler.format.reader import REFETCHES, Readable, read_into
from bundler.format.signing import VerifiedBundle

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Substitute:
    """What the installer runs instead of the full images: the deltas' ops and a plan
    whose image entries name their bases."""

    ops: OpTable
    plan: InstallPlan
    chosen: tuple[int, ...]  # manifest indices of the embedded deltas used, in image order
    table_bytes: int  # bytes of op tables fetched

    def summary(self) -> str:
        return (f"embedded delta{'s' if len(self.chosen) > 1 else ''} "
                f"{', '.join(str(k) for k in self.chosen)} for the base the booted slot holds: "
                f"{len(self.ops)} ops, op tables of {self.table_bytes} bytes fetched")


def choose(refs: Sequence[EmbeddedDeltaRef], plan: InstallPlan, recorded: dict[str, str | None]
           ) -> list[int] | None:
    """Per image of the plan, the index of the embedded delta whose base the booted slot's
    record names; None unless every image has one."""
    chosen = []
    for ip in plan.images:
        held = recorded.get(ip.image.slot_class)
        k = next((k for k, r in enumerate(refs) if r.slot_class == ip.image.slot_class and r.base_sha256 == held),
                 None)
        if k is None:
            return None
        chosen.append(k)
    return chosen


def substitute(
    device: Device,
    stream: Readable,
    *,
    bundle: VerifiedBundle,
    plan: InstallPlan,
    booted: str,
    state: AgentState,
    payload_start: int,
) -> Substitute | None:
    """The embedded deltas to run instead of the full images, or None (install the full
    images: no embedded delta for what the booted slot holds, not an adaptive install
    from a server, or a server that ignores Range). Fetches, writes nothing."""
    refs = bundle.manifest.embedded_deltas
    ranges = adaptive.range_source(stream)
    if not refs or ranges is None or not device.config.download.adaptive:
        return None
    recorded = {ip.image.slot_class: deltabase.recorded_image(device, state, ip.image.slot_class, booted)
                for ip in plan.images}
    chosen = choose(refs, plan, recorded)
    if chosen is None:
        held = ", ".join(f"{c} {(h or 'unknown')[:16]}" for c, h in recorded.items())
        log.info("the bundle's %d embedded deltas apply to none of the images booted slot %s holds (%s); "
                 "installing the full images", len(refs), booted, held)
        return None
    if not _ranges_work(ranges, payload_start + bundle.manifest.payload_length):
        return None
    # One buffer for the tables the install runs, each fetched straight into its place; in
    # the order of their sections in the bundle, so payloads are fetched front to back.
    combined = bytearray(sum(format_embedded.table_length(refs[k]) for k in chosen))
    images: list[ImagePlan] = []
    at = 0
    for ip, k in sorted(zip(plan.images, chosen, strict=True), key=lambda pair: refs[pair[1]].table_offset):
        ref = refs[k]
        n = format_embedded.table_length(ref)
        with memoryview(combined)[at : at + n] as view:
            table = _fetch_table(ranges, ref, k, ip, payload_start=payload_start, into=view)
            format_embedded.rebase(view, table, ref.payload_offset)
            del table
        entry = replace(ip.image, base_sha256=ref.base_sha256, base_size=ref.base_size,
                        op_first=at // OP_RECORD_SIZE, op_count=ref.table_count)
        images.append(ImagePlan(entry, ip.slot))
        at += n
    fetched = at
    images.sort(key=lambda ip: [p.image.slot_class for p in plan.images].index(ip.image.slot_class))
    sub = Substitute(unpack_table(combined), InstallPlan(plan.target, tuple(images)), tuple(chosen), fetched)
    log.info("%s", sub.summary())
    return sub


def _ranges_work(ranges: ResumableSource, total: int) -> bool:
    """Whether the server says how large the bundle is and honours Range (one 1-byte probe)."""
    return ranges.known_total == total and adaptive.honours_range(ranges, "installing the full images")


def _fetch_table(ranges: ResumableSource, ref: EmbeddedDeltaRef, k: int, ip: ImagePlan, *, payload_start: int,
                 into: memoryview) -> OpTable:
    """Embedded delta `k`'s op table by one Range request into `into`, checked (module
    docstring); fetched again when it arrives damaged."""
    n = len(into)
    region = f"embedded delta {k} op table"
    for tries in range(REFETCHES + 1):
        with ranges.fetch(payload_start + ref.table_offset, n) as part:
            read_into(part, into, region)
        try:
            return format_embedded.load_table(into, ref, k, ip.image)
        except HashMismatchError:
            if tries == REFETCHES:
                raise
            log.warning("%s: the op table of embedded delta %d arrived damaged; fetching it again", ranges.name, k)
    raise FormatError("unreachable", region=region)  # pragma: no cover
