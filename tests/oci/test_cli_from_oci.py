"""`ota-bundle image --from-oci` and `create --from-oci` through the CLI's
main(): one line or one JSON object, a bundle that verifies with the image's
hash, and usage errors that name the option."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from bundler.cli import main
from tests.oci._images import E, write_layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: owners are kept")

LAYERS = [[E("etc", "dir", mode=0o755), E("etc/os-release", data=b"ID=edge\n"), E("bin", "symlink", link="usr/bin")]]


def test_image_writes_a_filesystem_and_reports_it_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = write_layout(tmp_path / "layout", LAYERS)
    out = tmp_path / "rootfs.erofs"
    assert main(["image", "--from-oci", f"oci:{layout}:1", "--fs", "erofs", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fs"] == "erofs"
    assert doc["size"] == out.stat().st_size
    assert doc["layers"] == 1
    assert out.read_bytes()[1024:1028] == bytes.fromhex("e2e1f5e0")  # the erofs superblock magic


def test_create_from_oci_bundles_the_image_and_leaves_only_the_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = write_layout(tmp_path / "layout", LAYERS)
    assert main(["keygen", str(tmp_path / "keys")]) == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    bundle = out_dir / "os.otab"
    argv = ["create", "--from-oci", f"oci:{layout}:1", "--key", str(tmp_path / "keys/signing.key")]
    argv += ["--version", "2.0", "--security-version", "1", "--compatible", "board", "-o", str(bundle), "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    created = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out_dir.iterdir()) == ["os.otab"]
    assert main(["image", "--from-oci", f"oci:{layout}:1", "-o", str(tmp_path / "same.ext4")]) == 0
    image_hash = hashlib.sha256((tmp_path / "same.ext4").read_bytes()).hexdigest()
    assert created["images"][0]["sha256"] == image_hash  # the bundled image is the reproducible one
    capsys.readouterr()
    assert main(["verify", str(bundle), "--keyring", str(tmp_path / "keys/signing.pub")]) == 0
    assert "OK" in capsys.readouterr().out


def test_create_needs_exactly_one_of_image_and_from_oci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["create", "--key", "k", "--version", "1", "--security-version", "1", "--compatible", "b", "-o", "x"]
    assert main(argv) == 1
    assert "--image" in capsys.readouterr().err
    assert main([*argv, "--image", "a.img", "--from-oci", "oci:x"]) == 1
    assert "one of them" in capsys.readouterr().err


def test_bad_source_and_size_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "--from-oci", "oci:/nonexistent:1", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "not an OCI image layout" in err
    assert err.count("\n") == 1
    assert main(["image", "--from-oci", "oci:x", "--size", "12Q", "-o", str(tmp_path / "x")]) == 2
    assert "is not a size" in capsys.readouterr().err
