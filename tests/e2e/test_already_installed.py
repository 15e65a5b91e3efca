"""Installing a bundle whose every image a slot already holds — the booted slot,
or the other slot as the pending update — answers `already installed`: exit 0,
recorded as an install event with result `already-installed`, and nothing
written to either slot or to the bootloader. `--reinstall` writes it anyway.
Images are compared per slot class, so a bundle that changes any one image of a
multi-image device is installed."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bundler.format.header import HEADER_SIZE, Header
from bundler.format.manifest import ImageEntry, Manifest, parse
from bundler.format.ops import Op, OpType, unpack_table
from bundler.format.signing import load_private_key
from bundler.format.writer import op_table_digest, write_bundle_file
from tests.e2e._sim import COMPATIBLE, SLOT_SIZE, SimDevice, sha256_file
from tests.e2e.conftest import BundleFactory, DeviceFactory, Image, Images, KeyPair


def slot_files(device: SimDevice) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(device.dir.glob("*.img"))}


def assert_already_installed(device: SimDevice, bundle: Path, slot: str, *extra: str) -> None:
    before, slots_before = device.snapshot(), slot_files(device)
    outbox_before = len(device.outbox())
    run = device.install(bundle, *extra)
    assert run.rc == 0, run.err
    assert run.out.startswith("already installed:"), run.out
    after = device.snapshot()
    assert slot_files(device) == slots_before
    assert after.bootloader == before.bootloader
    state_before, state_after = before.agent_state(), after.agent_state()
    state_before.pop("last_result")
    last = state_after.pop("last_result")
    assert state_after == state_before
    assert (last["event"], last["result"], last["slot"]) == ("install", "already-installed", slot)
    assert [(e["event"], e["result"]) for e in device.outbox()[outbox_before:]] == [("install", "already-installed")]


def test_installing_the_pending_update_again_is_already_installed_and_writes_nothing(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    bundle = make_bundle("2.0", security_version=2)
    device.install_ok(bundle)
    assert_already_installed(device, bundle, "B")
    assert "pending in slot B" in device.status()["last_result"]["reason"]
    run = device.boot()
    assert run.out.splitlines()[-1] == "settled on slot B after 1 boot(s)"
    assert device.status()["committed_security_version"] == 2


def test_installing_what_the_booted_slot_runs_is_already_installed_whatever_the_version_string(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    device.install_ok(make_bundle("2.0"))
    device.boot()
    assert_already_installed(device, make_bundle("2.0"), "B")
    assert_already_installed(device, make_bundle("2.0.1"), "B")  # same image, rebuilt under another version
    assert "the booted slot B holds these images (version 2.0)" in device.status()["last_result"]["reason"]


def test_the_factory_image_is_already_installed_on_a_fresh_device(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    assert_already_installed(device, make_bundle("1.0", image=images.factory), "A")


def test_reinstall_writes_the_pending_update_again(
    device: SimDevice, make_bundle: BundleFactory, images: Images, tmp_path: Path
) -> None:
    bundle = make_bundle("2.0")
    device.install_ok(bundle)
    device.slot_path("B").write_bytes(bytes(SLOT_SIZE))  # damage B behind the agent's back
    run = device.install(bundle, "--reinstall")
    assert run.rc == 0, run.err
    assert "installed version 2.0 into slot B" in run.out
    assert device.slot_image_sha256("B", images.v2.size) == images.v2.sha256
    assert device.status()["last_result"]["result"] == "ok"


def test_reinstall_of_what_the_booted_slot_runs_writes_the_other_slot(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    device.install_ok(make_bundle("2.0"))
    device.boot()
    run = device.install(make_bundle("2.0"), "--reinstall")
    assert run.rc == 0, run.err
    assert "into slot A" in run.out
    assert device.slot_image_sha256("A", images.v2.size) == images.v2.sha256


def test_a_slot_holding_the_image_but_rolled_back_is_written_again(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    bundle = make_bundle("2.0")
    device.install_ok(bundle)
    device.boot("fail")  # B rolled back: it holds 2.0 but is bad, neither booted nor pending
    run = device.install(bundle)
    assert run.rc == 0, run.err
    assert "installed version 2.0 into slot B" in run.out


def test_already_installed_under_json_reports_its_own_result(device: SimDevice, make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0")
    device.install_ok(bundle)
    run = device.install(bundle, "--json")
    assert run.rc == 0, run.err
    assert '"result": "already-installed"' in run.out
    assert '"reboot_to_try": false' in run.out


# --- a device with two slot classes ------------------------------------------------


def two_class_device(make_device: DeviceFactory, factory: Image) -> SimDevice:
    """A simulated device with an `app` slot next to each rootfs slot."""
    device = make_device()
    for b in ("A", "B"):
        app = device.dir / f"app-{b}.img"
        shutil.copyfile(factory.path, app)
        with app.open("r+b") as f:
            f.truncate(SLOT_SIZE)
    text = device.config.read_text().replace(
        "\n[health]", "".join(f'\n[[slots]]\nbootname = "{b}"\nclass = "app"\npath = "app-{b}.img"\n' for b in "AB")
        + "\n[health]",
    )
    device.config.write_text(text)
    return device


def two_image_bundle(parts: dict[str, Path], key: KeyPair, version: str, out: Path) -> Path:
    """One signed bundle holding the image of each single-image bundle in `parts`, per slot class."""
    ops: list[Op] = []
    images: list[ImageEntry] = []
    payload = bytearray()
    for slot_class, bundle in parts.items():
        raw = bundle.read_bytes()
        h = Header.unpack(raw[:HEADER_SIZE])
        image = parse(raw[h.manifest_offset : h.manifest_offset + h.manifest_length]).images[0]
        part_ops = unpack_table(raw[h.op_table_offset : h.payload_offset])
        images.append(replace(image, slot_class=slot_class, op_first=len(ops), op_count=len(part_ops)))
        shift = len(payload)
        ops += [
            replace(op, payload_offset=op.payload_offset + shift) if op.type is OpType.REPLACE else op
            for op in part_ops
        ]
        pieces = sum(op.payload_length for op in part_ops)  # the op payloads, without a block index
        payload += raw[h.payload_offset : h.payload_offset + pieces]
    manifest = Manifest(
        bundle_version=version,
        security_version=1,
        compatible=COMPATIBLE,
        created=datetime.now(UTC).replace(microsecond=0),
        expires=None,
        images=tuple(images),
        op_count=len(ops),
        op_table_sha256=op_table_digest(ops),
        payload_length=len(payload),
    )
    spool = out.with_suffix(".payload")
    spool.write_bytes(bytes(payload))
    write_bundle_file(out, manifest, ops, spool, [load_private_key(key.private)])
    return out


def test_images_are_compared_per_slot_class(
    make_device: DeviceFactory, make_bundle: BundleFactory, images: Images, signing_key: KeyPair, tmp_path: Path
) -> None:
    device = two_class_device(make_device, images.factory)
    v2, v3, factory = (make_bundle("x", image=i) for i in (images.v2, images.v3, images.factory))
    first = two_image_bundle({"rootfs": v2, "app": v3}, signing_key, "2.0", tmp_path / "first.otab")
    same_rootfs = two_image_bundle({"rootfs": v2, "app": factory}, signing_key, "2.1", tmp_path / "second.otab")

    run = device.install(first)
    assert run.rc == 0, run.err
    assert device.status()["slots"]["B"]["version"] == "2.0"
    assert sha256_file(device.dir / "app-B.img", images.v3.size) == images.v3.sha256
    assert_already_installed(device, first, "B")
    # Same rootfs image, another app image: not installed yet, so it is written.
    run = device.install(same_rootfs)
    assert run.rc == 0, run.err
    assert "installed version 2.1 into slot B" in run.out
    assert device.slot_image_sha256("B", images.v2.size) == images.v2.sha256
    assert sha256_file(device.dir / "app-B.img", images.factory.size) == images.factory.sha256
    assert_already_installed(device, same_rootfs, "B")
