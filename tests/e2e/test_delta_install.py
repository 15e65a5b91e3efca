"""A delta bundle (`ota-bundle create --base`) of two small ext4 images made by
mkfs.ext4 -d installs v1 -> v2 on the simulated device with the real CLIs:
the target slot then holds v2 byte for byte, the boot commits it, and the
bundle is a fraction of the full one. A device whose booted slot is not the
base refuses it before anything is written (slot, bootloader state unchanged).
`ota-bundle verify` checks a delta only against its base."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import sim
from bundler.cli import main as bundle_main
from tests.e2e._sim import COMPATIBLE, SLOT_SIZE, SimDevice, sha256_file
from tests.e2e.conftest import KeyPair

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) not installed")
IMAGE_MIB = 6


def fill_tree(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    for d in range(6):
        (root / f"dir{d}").mkdir(parents=True)
        for f in range(8):
            if f % 3 == 0:
                data = rng.randbytes(rng.randint(1000, 60_000))
            else:
                data = b" ".join(rng.choice(words) for _ in range(rng.randint(200, 8000)))
            (root / f"dir{d}" / f"file{f}").write_bytes(data)


def mkfs(tree: Path, image: Path) -> Path:
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", "6b5c0f2e-0c1d-4b7a-9c3e-0123456789ab",
         "-E", "hash_seed=3c5e7a9b-1d2f-4e6a-8b0c-fedcba987654", "-d", str(tree), str(image), f"{IMAGE_MIB}M"],
        check=True, env=env, capture_output=True,
    )
    return image


@pytest.fixture(scope="module")
def ext4_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """v1, v2 (v1 with files edited, added, removed) and an unrelated image."""
    d = tmp_path_factory.mktemp("ext4")
    fill_tree(d / "v1", 1)
    shutil.copytree(d / "v1", d / "v2")
    edited = d / "v2" / "dir2" / "file1"
    data = bytearray(edited.read_bytes())
    data[100:100] = b"a security fix, inserted"
    edited.write_bytes(bytes(data))
    (d / "v2" / "dir0" / "file4").unlink()
    (d / "v2" / "dir5" / "new").write_bytes((d / "v1" / "dir3" / "file2").read_bytes()[::2])
    fill_tree(d / "other", 9)
    return mkfs(d / "v1", d / "v1.ext4"), mkfs(d / "v2", d / "v2.ext4"), mkfs(d / "other", d / "other.ext4")


def device_on(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: KeyPair, factory: Path, name: str) -> SimDevice:
    sim.init(sim.SimSpec(tmp_path / name, factory, key.public, COMPATIBLE, slot_size=SLOT_SIZE))
    return SimDevice(tmp_path / name, capsys)


def create(tmp_path: Path, key: KeyPair, image: Path, *base: str) -> Path:
    out = tmp_path / f"{image.stem}{'-delta' if base else ''}.otab"
    argv = ["create", "--image", str(image), *base, "--key", str(key.private), "--version", "2.0"]
    argv += ["--security-version", "2", "--compatible", COMPATIBLE, "--level", "3", "-o", str(out)]
    assert bundle_main(argv) == 0
    return out


def test_a_delta_bundle_installs_v1_to_v2_and_commits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, ext4_pair: tuple[Path, Path, Path]
) -> None:
    v1, v2, _ = ext4_pair
    delta = create(tmp_path, signing_key, v2, "--base", str(v1))
    full = create(tmp_path, signing_key, v2)
    assert delta.stat().st_size < full.stat().st_size / 3
    assert bundle_main(["verify", str(delta), "--keyring", str(signing_key.public), "--base", str(v1)]) == 0
    assert bundle_main(["verify", str(delta), "--keyring", str(signing_key.public)]) == 1
    assert "is a delta: give its base image with --base" in capsys.readouterr().err
    dev = device_on(tmp_path, capsys, signing_key, v1, "device")

    run = dev.install(delta)

    assert run.rc == 0, run.err
    assert dev.slot_image_sha256("B", v2.stat().st_size) == sha256_file(v2)
    assert dev.slot_image_sha256("A", v1.stat().st_size) == sha256_file(v1), "the booted slot is untouched"
    dev.boot()
    doc = dev.status()
    assert (doc["booted"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "good", "2.0")


def test_a_delta_for_another_base_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, ext4_pair: tuple[Path, Path, Path]
) -> None:
    v1, v2, other = ext4_pair
    delta = create(tmp_path, signing_key, v2, "--base", str(v1))
    dev = device_on(tmp_path, capsys, signing_key, other, "elsewhere")
    before = dev.snapshot()

    line = dev.install(delta).one_error_line()

    assert "delta for rootfs applies to base" in line
    assert "but booted slot A holds" in line
    assert "nothing written" in line
    after = dev.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B"))
    assert after.bootloader == before.bootloader, "slot B was not even marked bad"
    assert dev.outbox()[-1]["result"] == "failed"
