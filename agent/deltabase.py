"""The base a delta bundle applies to: which booted slot holds it, and the check,
before anything is written, that it holds exactly the manifest's base image.

The check asks the slot record first (docs/delta.md, "Checking the base"): the
state names, per slot class, the SHA-256 of the image the agent wrote, read
back and recorded into each slot. A booted slot whose record names the base is
accepted without reading it again: every extent the delta reads from it is
hash-checked before use anyway, so a slot that changed behind the record fails
the install on the first changed extent it reads, with the target still marked
bad. Any other answer (no record, a record of an older kind that cannot name the
class, a record naming another image) is settled by hashing the slot's first
`base_size` bytes: a device that does not run the base is refused with nothing
written, and a stale record does not refuse a slot that does hold the base.
"""

from __future__ import annotations

import enum
from pathlib import Path

from agent.daemon import Device
from agent.errors import InstallError
from agent.plan import InstallPlan
from agent.state import AgentState
from bundler.format.apply import file_sha256
from hw.slot import slot_size


class BaseProof(enum.Enum):
    """How check_bases knew that a booted slot holds a delta's base."""

    RECORD = "record"  # the slot record names it; the per-extent hashes check what is read
    HASHED = "hashed"  # its first base_size bytes were hashed


def booted_slot_of(device: Device, slot_class: str, booted: str) -> Path:
    for s in device.config.slots:
        if s.slot_class == slot_class and s.bootname == booted:
            return s.path
    raise InstallError(f"no {slot_class} slot in the booted slot group {booted} to read a delta's base from")


def recorded_image(device: Device, state: AgentState, slot_class: str, booted: str) -> str | None:
    """The SHA-256 the state records for the `slot_class` image of the booted slot
    group, or None when it does not say (no record, or one from before per-class
    hashes on a device with several slot classes)."""
    record = state.slots.get(booted)
    if record is None:
        return None
    if record.images is not None:
        return record.images.get(slot_class)
    classes = {s.slot_class for s in device.config.slots}
    return record.sha256 if len(classes) == 1 else None


def check_bases(device: Device, plan: InstallPlan, booted: str, state: AgentState) -> dict[str, BaseProof]:
    """A delta image applies only onto its base: the booted slot of its class must
    hold exactly the base image. Checked before anything is written (see the module
    docstring); the source extents are hash-checked again as they are read.
    Returns, per delta image's class, how the base was known."""
    proofs: dict[str, BaseProof] = {}
    for ip in plan.images:
        image = ip.image
        if image.base_sha256 is None or image.base_size is None:
            continue
        path = booted_slot_of(device, image.slot_class, booted)
        held = slot_size(path, booted)
        if held < image.base_size:
            raise InstallError(
                f"delta for {image.slot_class} needs a {image.base_size}-byte base; booted slot {booted} "
                f"holds only {held} bytes; install a full bundle"
            )
        if recorded_image(device, state, image.slot_class, booted) == image.base_sha256:
            proofs[image.slot_class] = BaseProof.RECORD
            continue
        actual = file_sha256(path, image.base_size)
        if actual != image.base_sha256:
            raise InstallError(
                f"delta for {image.slot_class} applies to base {image.base_sha256[:16]}…, but booted slot "
                f"{booted} holds {actual[:16]}…; nothing written (install a full bundle)"
            )
        proofs[image.slot_class] = BaseProof.HASHED
    return proofs
