"""Every crafted hostile bundle of `tests.reliability.hostile` (at least 50) is
installed on a simulated device and rejected with its specific error, in one
line; a bundle refused at its head leaves both slots and the bootloader state
byte for byte as they were, one refused mid-stream leaves the booted slot and
its boot state untouched and the target unbootable; and afterwards a genuine
bundle still installs and commits."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from agent import sim
from agent.daemon import build_device
from agent.installer import install
from bundler.build import BundleSpec, build_full
from bundler.format.reader import BundleReader
from bundler.format.signing import generate_key, load_private_key, verify
from hw.bootloader.model import SlotBootState
from ota_common.errors import OtaError
from tests.reliability.hostile import Hostile, from_good, signed
from tests.reliability.results import record

COMPATIBLE = "hostile-board"
MiB = 1 << 20


class Rig:
    def __init__(self, d: Path) -> None:
        self.dir = d
        keys = d / "keys"
        keys.mkdir(parents=True)
        private, public = generate_key(keys)
        other, _ = generate_key(d / "other")
        self.key, self.other = load_private_key(private), load_private_key(other)
        data = bytes(range(256)) * 1024 + bytes(MiB) + hashlib.sha256(b"x").digest() * 4096
        image = d / "v2.img"
        image.write_bytes(data)
        self.good_path = d / "v2.otab"
        build_full(BundleSpec(image=image, key=private, version="2.0", security_version=2, compatible=COMPATIBLE,
                              threads=1), self.good_path)
        factory = d / "factory.img"
        self.factory = b"factory" * 100000
        factory.write_bytes(self.factory)
        self.device = d / "device"
        sim.init(sim.SimSpec(directory=self.device, image=factory, keyring=public, compatible=COMPATIBLE,
                             bootloader="uboot", slot_size=4 * MiB, tries=3))
        sim.power_on(self.device, say=lambda _: None)

    def snapshot(self) -> dict[str, str]:
        out = {}
        for p in sorted(self.device.rglob("*")):
            rel = str(p.relative_to(self.device))
            if p.is_file() and (rel.startswith("slot-") or "uboot" in rel or rel.endswith(".env")):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


def _cases(rig: Rig) -> list[Hostile]:
    good = rig.good_path.read_bytes()
    reader = BundleReader(io.BytesIO(good))
    ops = list(reader.read_op_table(verify(reader.read_head(), build_device(sim.config_path(rig.device)).keyring())))
    return from_good(good, ops) + signed(rig.key, rig.other, COMPATIBLE, 2, rig.factory)


def test_every_crafted_hostile_bundle_is_rejected_with_its_error_and_changes_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    cases = _cases(rig)
    assert len(cases) >= 50
    problems: list[str] = []
    for case in cases:
        found = _try(rig, case)
        record("hostile bundle", case.name, passed=not found, unrecovered=len(found))
        problems += [f"{case.name}: {p}" for p in found]
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
    # the device still takes a genuine update
    device = build_device(sim.config_path(rig.device))
    with rig.good_path.open("rb") as f:
        install(device, f)
    sim.power_on(rig.device, say=lambda _: None)
    assert build_device(sim.config_path(rig.device)).bootloader.booted_slot() == "B"


def _try(rig: Rig, case: Hostile) -> list[str]:
    before = rig.snapshot()
    device = build_device(sim.config_path(rig.device))
    booted = device.bootloader.booted_slot()
    boot_before = device.bootloader.state().slots[booted]
    path = rig.dir / "case.otab"
    path.write_bytes(case.data)
    try:
        with path.open("rb") as f:
            install(device, f)
    except OtaError as e:
        error = e
    except Exception as e:  # anything but a documented error is the finding
        return [f"raised {type(e).__name__}: {e}"]
    else:
        return ["was installed"]
    problems = []
    text = str(error)
    if not isinstance(error, case.error):
        problems.append(f"rejected with {type(error).__name__} ({text}), expected {case.error.__name__}")
    if case.message and case.message not in text:
        problems.append(f"error {text!r} does not say {case.message!r}")
    if "\n" in text or not text:
        problems.append(f"error is not one line: {text!r}")
    after = rig.snapshot()
    other = "B" if booted == "A" else "A"
    state = build_device(sim.config_path(rig.device)).bootloader.state()
    if after[f"slot-{booted}.img"] != before[f"slot-{booted}.img"]:
        problems.append(f"the booted slot {booted} was written")
    if state.slots[booted] != boot_before:
        problems.append(f"the booted slot's boot state changed: {state.slots[booted].describe()}")
    if case.stage == "head" and after != before:
        changed = sorted(k for k in after if after[k] != before.get(k))
        problems.append(f"refused at the head but changed {changed}")
    if case.stage == "payload" and state.slots[other].state is not SlotBootState.BAD and after != before:
        problems.append(f"slot {other} was written and is {state.slots[other].describe()}, not bad")
    return problems


def test_the_generator_covers_every_class_the_issue_names(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    names = " ".join(c.name for c in _cases(rig))
    for needle in ("truncated", "bit flip in header", "= 0", "= 2147483648", "= 4294967295", "= 9223372036854775808",
                   "bomb", "overlapping", "beyond the image", "reordered", "wrong base", "source extent hash lies",
                   "trailing data"):
        assert needle in names, needle
