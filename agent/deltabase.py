"""The base a delta bundle applies to: which booted slot holds it, and the check,
before anything is written, that it holds exactly the manifest's base image."""

from __future__ import annotations

from pathlib import Path

from agent.daemon import Device
from agent.errors import InstallError
from agent.plan import InstallPlan
from bundler.format.apply import file_sha256
from hw.slot import slot_size


def booted_slot_of(device: Device, slot_class: str, booted: str) -> Path:
    for s in device.config.slots:
        if s.slot_class == slot_class and s.bootname == booted:
            return s.path
    raise InstallError(f"no {slot_class} slot in the booted slot group {booted} to read a delta's base from")


def check_bases(device: Device, plan: InstallPlan, booted: str) -> None:
    """A delta image applies only onto its base: the booted slot of its class must
    hold exactly the base image. Checked before anything is written; the source
    extents are hash-checked again as they are read."""
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
        actual = file_sha256(path, image.base_size)
        if actual != image.base_sha256:
            raise InstallError(
                f"delta for {image.slot_class} applies to base {image.base_sha256[:16]}…, but booted slot "
                f"{booted} holds {actual[:16]}…; nothing written (install a full bundle)"
            )
