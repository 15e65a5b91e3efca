"""A bundle with two images (rootfs and appfs), made by `ota-bundle create
--image CLASS=PATH` twice, installs onto a device whose config has both slot
classes: each image lands in the target group's slot of its class, the booted
group is untouched, and after a boot the group is committed. A device without
the appfs class refuses the bundle and writes nothing.

`ota-agent sim init` makes a one-class device; the appfs slots are added to its
config by hand here, the way an integrator would."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundler.cli import main as bundle_main
from tests.e2e._sim import MiB, SimDevice, sha256_file, write_image
from tests.e2e.conftest import DeviceFactory, Image, Images, KeyPair

APPFS_SLOT_SIZE = 4 * MiB


def add_appfs_class(dev: SimDevice, factory: Path) -> None:
    for bootname in ("A", "B"):
        slot = dev.dir / f"appfs-{bootname}.img"
        slot.write_bytes(factory.read_bytes())
        with slot.open("r+b") as f:
            f.truncate(APPFS_SLOT_SIZE)
    with dev.config.open("a") as f:
        for bootname in ("A", "B"):
            f.write(f'\n[[slots]]\nbootname = "{bootname}"\nclass = "appfs"\npath = "appfs-{bootname}.img"\n')


@pytest.fixture
def appfs_images(tmp_path: Path) -> tuple[Image, Image]:
    """(factory appfs, new appfs); sizes not multiples of 4096."""
    factory = write_image(tmp_path / "appfs-factory.img", 11, MiB + 17)
    new = write_image(tmp_path / "appfs-v2.img", 12, 3 * MiB + 5)
    return (
        Image(factory, factory.stat().st_size, sha256_file(factory)),
        Image(new, new.stat().st_size, sha256_file(new)),
    )


def two_image_bundle(tmp_path: Path, key: KeyPair, rootfs: Image, appfs: Image) -> Path:
    out = tmp_path / "system-2.0.otab"
    argv = ["create", "--image", f"rootfs={rootfs.path}", "--image", f"appfs={appfs.path}"]
    argv += ["--key", str(key.private), "--version", "2.0", "--security-version", "3"]
    argv += ["--compatible", "e2e-board-v1", "--level", "3", "-o", str(out)]
    assert bundle_main(argv) == 0
    return out


def test_a_two_image_bundle_fills_both_slots_of_the_target_group_and_commits(
    tmp_path: Path,
    make_device: DeviceFactory,
    images: Images,
    appfs_images: tuple[Image, Image],
    signing_key: KeyPair,
) -> None:
    factory_appfs, new_appfs = appfs_images
    dev = make_device()
    add_appfs_class(dev, factory_appfs.path)
    bundle = two_image_bundle(tmp_path, signing_key, images.v2, new_appfs)
    before = {name: sha256_file(dev.dir / name) for name in ("slot-A.img", "appfs-A.img")}

    run = dev.install(bundle)
    assert run.rc == 0, run.err
    assert dev.slot_image_sha256("B", images.v2.size) == images.v2.sha256
    assert sha256_file(dev.dir / "appfs-B.img", new_appfs.size) == new_appfs.sha256
    assert {name: sha256_file(dev.dir / name) for name in before} == before, "the booted group is untouched"
    doc = dev.status()
    assert doc["slots"]["B"]["paths"] == {"rootfs": str(dev.dir / "slot-B.img"), "appfs": str(dev.dir / "appfs-B.img")}
    assert (doc["primary"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "trial", "2.0")

    dev.boot()
    doc = dev.status()
    assert (doc["booted"], doc["slots"]["B"]["boot_state"]) == ("B", "good")
    assert doc["committed_security_version"] == 3
    assert sha256_file(dev.dir / "appfs-B.img", new_appfs.size) == new_appfs.sha256
    assert dev.slot_image_sha256("B", images.v2.size) == images.v2.sha256


def test_a_device_without_the_appfs_class_refuses_the_two_image_bundle_and_writes_nothing(
    tmp_path: Path,
    device: SimDevice,
    images: Images,
    appfs_images: tuple[Image, Image],
    signing_key: KeyPair,
) -> None:
    bundle = two_image_bundle(tmp_path, signing_key, images.v2, appfs_images[1])
    before = device.snapshot()
    line = device.install(bundle).one_error_line()
    assert "slot class 'appfs'" in line
    assert device.snapshot().slot("B") == before.slot("B")
