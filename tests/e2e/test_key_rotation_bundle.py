"""Key rotation: `ota-bundle create --key OLD --key NEW` signs with both keys,
so a device that still trusts only the old key and one that already trusts
only the new key both install the same bundle; a device trusting neither
refuses it, naming both key ids, and writes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bundler.cli import main as bundle_main
from bundler.format.signing import key_id, load_public_key
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import DeviceFactory, Images, KeyPair


def trust_only(dev: SimDevice, public: Path) -> None:
    keys = dev.dir / "keys"
    shutil.rmtree(keys)
    keys.mkdir()
    shutil.copyfile(public, keys / "only.pub")


@pytest.fixture
def rotation_bundle(tmp_path: Path, signing_key: KeyPair, other_key: KeyPair, images: Images) -> Path:
    out = tmp_path / "rotated.otab"
    argv = ["create", "--image", str(images.v2.path), "--key", str(other_key.private)]
    argv += ["--key", str(signing_key.private), "--version", "2.0", "--security-version", "1"]
    argv += ["--compatible", "e2e-board-v1", "--level", "3", "-o", str(out)]
    assert bundle_main(argv) == 0
    return out


@pytest.mark.parametrize("trusted", ["signing_key", "other_key"])
def test_a_device_trusting_either_key_alone_installs_a_bundle_signed_by_both(
    make_device: DeviceFactory, images: Images, rotation_bundle: Path, trusted: str, request: pytest.FixtureRequest
) -> None:
    key: KeyPair = request.getfixturevalue(trusted)
    dev = make_device()
    trust_only(dev, key.public)
    run = dev.install(rotation_bundle)
    assert run.rc == 0, run.err
    assert dev.slot_image_sha256("B", images.v2.size) == images.v2.sha256


def test_a_device_trusting_neither_key_refuses_and_names_both(
    tmp_path: Path, make_device: DeviceFactory, rotation_bundle: Path, signing_key: KeyPair, other_key: KeyPair
) -> None:
    stranger = tmp_path / "stranger"
    assert bundle_main(["keygen", str(stranger)]) == 0
    dev = make_device()
    trust_only(dev, stranger / "signing.pub")
    before = dev.snapshot()
    line = dev.install(rotation_bundle).one_error_line()
    for pair in (other_key, signing_key):
        assert key_id(load_public_key(pair.public)).hex()[:16] in line
    assert dev.snapshot().slot("B") == before.slot("B")
