"""`ota-bundle usb` with the real FAT tools (mkfs.vfat, mtools): `prepare`
lays out a directory or a new FAT image by the convention and refuses a file
that is not a bundle (or an image too small) before writing anything; `report`
reads receipts back from a directory or an image, and a hostile receipt file
(a symlink, garbage, an oversized one) is reported and skipped, never trusted."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bundler.build import BundleSpec, build_full
from bundler.cli import main
from bundler.format.signing import generate_key
from ota_common.media import MAX_RECEIPT, Outcome, Receipt

pytestmark = pytest.mark.skipif(shutil.which("mcopy") is None or shutil.which("mkfs.vfat") is None,
                                reason="mtools and dosfstools needed")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("usb-bundle")
    image = d / "img"
    image.write_bytes(bytes(range(256)) * 4096)
    private, _ = generate_key(d / "keys")
    out = d / "rootfs-2.0.otab"
    build_full(BundleSpec(image=image, key=private, version="2.0", security_version=1, compatible="board-x"), out)
    return out


def receipt(device: str) -> Receipt:
    return Receipt(device=device, result=Outcome.INSTALLED, reason="ok", time="2026-12-01T10:00:00Z", txn="t1",
                   old_version="1.0", new_version="2.0")


def test_prepare_a_directory_lays_out_the_convention(tmp_path: Path, bundle: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usb", "prepare", str(tmp_path / "stick"), str(bundle), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bundles"] == [{"file": "edge-ota/rootfs-2.0.otab", "bundle_version": "2.0", "compatible": "board-x",
                               "security_version": 1, "size": bundle.stat().st_size}]
    assert (tmp_path / "stick/edge-ota/rootfs-2.0.otab").read_bytes() == bundle.read_bytes()
    assert (tmp_path / "stick/edge-ota/reports").is_dir()


def test_prepare_an_image_makes_a_fat_stick_mtools_can_read(tmp_path: Path, bundle: Path) -> None:
    image = tmp_path / "stick.img"
    assert main(["usb", "prepare", "--image", str(image), "--size", "40M", str(bundle)]) == 0
    assert image.stat().st_size == 40 << 20
    out = tmp_path / "copy.otab"
    subprocess.run(["mcopy", "-i", str(image), "::edge-ota/rootfs-2.0.otab", str(out)], check=True)
    assert out.read_bytes() == bundle.read_bytes()
    assert subprocess.run(["fsck.vfat", "-n", str(image)], capture_output=True, check=False).returncode == 0


def test_prepare_refuses_a_non_bundle_and_a_too_small_image_writing_nothing(
    tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.otab"
    junk.write_bytes(b"hello")
    assert main(["usb", "prepare", str(tmp_path / "stick"), str(bundle), str(junk)]) == 1
    assert "junk.otab: not a bundle:" in capsys.readouterr().err
    assert not (tmp_path / "stick").exists()
    assert main(["usb", "prepare", "--image", str(tmp_path / "s.img"), "--size", "1M", str(bundle)]) == 1
    assert "too small" in capsys.readouterr().err
    assert list(tmp_path.glob("*s.img*")) == []


def test_report_reads_receipts_from_a_directory_and_an_image_and_skips_hostile_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = tmp_path / "stick" / "EDGE-OTA" / "reports"
    reports.mkdir(parents=True)
    (reports / "b.json").write_bytes(receipt("dev-b").encode())
    (reports / "garbage.json").write_bytes(b"{not json")
    (reports / "huge.json").write_bytes(b" " * (MAX_RECEIPT + 10))
    (reports / "link.json").symlink_to(reports / "b.json")
    assert main(["usb", "report", str(tmp_path / "stick")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "2026-12-01T10:00:00Z dev-b: installed (1.0 -> 2.0): ok\n"
    assert "garbage.json: not a receipt:" in captured.err
    assert "huge.json: not a receipt: larger than" in captured.err
    assert "link.json: not a receipt: not opened:" in captured.err

    image = tmp_path / "stick.img"
    with image.open("wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
    subprocess.run(["mmd", "-i", str(image), "::edge-ota", "::edge-ota/reports"], check=True)
    (tmp_path / "a.json").write_bytes(receipt("dev-a").encode())
    subprocess.run(["mcopy", "-i", str(image), str(tmp_path / "a.json"), "::edge-ota/reports/a.json"], check=True)
    assert main(["usb", "report", "--image", str(image), "--json"]) == 0
    [found] = json.loads(capsys.readouterr().out)["receipts"]
    assert found["receipt"]["device"] == "dev-a"
