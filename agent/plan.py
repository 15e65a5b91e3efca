"""Planning an install: which image goes to which slot. Pure (RAUC's
install plans): takes the verified bundle, the configured slots, the booted
bootname and the slots' capacities; returns the plan or a PlanError."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.config import SlotConfig
from agent.errors import PlanError
from bundler.format.manifest import ImageEntry
from bundler.format.signing import VerifiedBundle


@dataclass(frozen=True, slots=True)
class ImagePlan:
    image: ImageEntry
    slot: SlotConfig


@dataclass(frozen=True, slots=True)
class InstallPlan:
    target: str  # bootname that receives the update
    images: tuple[ImagePlan, ...]

    def image_for_op(self, index: int) -> ImagePlan:
        for ip in self.images:
            if ip.image.op_first <= index < ip.image.op_first + ip.image.op_count:
                return ip
        raise PlanError(f"op {index} belongs to no image")


def make_plan(
    bundle: VerifiedBundle,
    slots: tuple[SlotConfig, ...],
    booted: str | None,
    capacity: Mapping[tuple[str, str], int],
    *,
    target: str | None = None,
) -> InstallPlan:
    """`target` None: the first slot that is not booted. Named (factory provisioning,
    `booted` None): that slot, which must be configured and not booted."""
    bootnames = list(dict.fromkeys(s.bootname for s in slots))
    if booted is not None and booted not in bootnames:
        raise PlanError(f"booted slot {booted!r} is not configured (slots: {', '.join(bootnames)})")
    if target is None:
        if booted is None:
            raise PlanError("no slot is booted and no target slot was named")
        target = next(b for b in bootnames if b != booted)
    elif target not in bootnames or target == booted:
        raise PlanError(f"target slot {target!r} is not a configured slot that is not booted")
    plans = []
    classes = sorted({s.slot_class for s in slots})
    seen = set()
    for image in bundle.manifest.images:
        if image.slot_class in seen:
            raise PlanError(f"bundle has two images for slot class {image.slot_class!r}")
        seen.add(image.slot_class)
        slot = next((s for s in slots if s.slot_class == image.slot_class and s.bootname == target), None)
        if slot is None:
            raise PlanError(f"bundle has an image for slot class {image.slot_class!r}; this device has {classes}")
        cap = capacity[(slot.slot_class, slot.bootname)]
        if image.size > cap:
            raise PlanError(f"image for {image.slot_class} is {image.size} bytes; slot {target} holds only {cap}")
        plans.append(ImagePlan(image, slot))
    return InstallPlan(target, tuple(plans))
