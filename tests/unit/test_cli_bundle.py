"""`ota-bundle` driven in-process through bundler.cli.main(argv): keygen,
create, inspect --json, verify; errors are one line on stderr, exit code 1,
no traceback."""

from __future__ import annotations

import hashlib
import json
import random
import stat
from pathlib import Path

import pytest

from bundler.cli import main
from bundler.format.header import HEADER_SIZE

MiB = 1 << 20


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    assert main(["keygen", str(directory)]) == 0
    return directory


@pytest.fixture
def image(tmp_path: Path) -> bytes:
    block = random.Random(7).randbytes(4096)
    data = block * 256 + bytes(2 * MiB) + random.Random(8).randbytes(5000)
    (tmp_path / "rootfs.img").write_bytes(data)
    return data


def create(tmp_path: Path, keys: Path, *extra: str) -> Path:
    out = tmp_path / "update.otab"
    argv = [
        "create",
        "--image",
        str(tmp_path / "rootfs.img"),
        "--key",
        str(keys / "signing.key"),
        "--version",
        "2.1.0",
        "--security-version",
        "5",
        "--compatible",
        "acme-gw",
        "--level",
        "3",
        "-o",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return out


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ota-bundle: error: ")
    return lines[0]


def test_keygen_writes_a_private_key_only_the_owner_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "new" / "keys"
    assert main(["keygen", str(keys)]) == 0
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    assert (keys / "signing.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (keys / "signing.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    out = capsys.readouterr().out
    assert f"wrote {keys / 'signing.key'}" in out
    assert str(keys / "signing.pub") in out


def test_keygen_refuses_to_overwrite_an_existing_key(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (keys / "signing.key").read_bytes()
    capsys.readouterr()
    assert main(["keygen", str(keys)]) == 1
    assert "already exists" in one_error_line(capsys)
    assert (keys / "signing.key").read_bytes() == before


def test_create_writes_a_bundle_and_reports_it(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    out = create(tmp_path, keys)
    assert out.exists()
    assert not list(tmp_path.glob(".update.otab*")), "no temporary files left beside the output"
    line = capsys.readouterr().out
    assert f"wrote {out}: version 2.1.0" in line
    assert f"image {len(image)} bytes" in line


def test_inspect_json_shows_layout_and_operations(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    out = create(tmp_path, keys, "--expires", "2030-01-01T00:00:00Z", "--slot-class", "system")
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["signer"] is None, "no keyring: shown as unverified"
    assert (info["bundle_version"], info["security_version"], info["compatible"]) == ("2.1.0", 5, "acme-gw")
    assert info["expires"] == "2030-01-01T00:00:00Z"
    assert info["manifest_offset"] == HEADER_SIZE
    assert info["bundle_length"] == out.stat().st_size
    assert info["payload_offset"] + info["payload_length"] == info["bundle_length"]
    (img,) = info["images"]
    assert (img["slot_class"], img["size"], img["sha256"]) == ("system", len(image), hashlib.sha256(image).hexdigest())
    ops = info["operations"]
    assert [op["type"] for op in ops] == ["REPLACE", "ZERO", "REPLACE"]
    assert sum(op["dst_length"] for op in ops) == len(image)
    data = out.read_bytes()
    for op in ops:
        if op["type"] == "REPLACE":
            start = info["payload_offset"] + op["payload_offset"]
            assert data[start : start + 4] == b"\x28\xb5\x2f\xfd", "each piece is a zstd frame at its offset"


def test_inspect_with_keyring_names_the_signer(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    out = create(tmp_path, keys)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json", "--keyring", str(keys / "signing.pub")]) == 0
    signer = json.loads(capsys.readouterr().out)["signer"]
    assert isinstance(signer, str)
    assert len(signer) == 64
    assert main(["inspect", str(out), "--keyring", str(keys)]) == 0
    assert f"verified, key {signer[:16]}" in capsys.readouterr().out


def test_verify_accepts_a_genuine_bundle(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    out = create(tmp_path, keys)
    capsys.readouterr()
    assert main(["verify", str(out), "--keyring", str(keys)]) == 0
    assert f"{out}: OK - signed by key" in capsys.readouterr().out


def test_verify_rejects_a_tampered_bundle_with_one_line(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    out = create(tmp_path, keys)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["payload_offset"] + 10
    data = bytearray(out.read_bytes())
    data[first] ^= 0xFF
    out.write_bytes(bytes(data))
    assert main(["verify", str(out), "--keyring", str(keys / "signing.pub")]) == 1
    assert "op 0: payload hash mismatch" in one_error_line(capsys)


def test_verify_rejects_a_bundle_from_another_key(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    out = create(tmp_path, keys)
    other = tmp_path / "other"
    assert main(["keygen", str(other)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--keyring", str(other / "signing.pub")]) == 1
    assert "none of which is in the keyring" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{tmp}/rootfs.img"], "bad magic"),
        (["verify", "{tmp}/missing.otab", "--keyring", "{tmp}/keys"], "missing.otab"),
        (["verify", "{tmp}/rootfs.img", "--keyring", "{tmp}/nokeys"], "nokeys"),
    ],
)
def test_bad_input_is_one_error_line(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "nokeys").mkdir()
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    assert message in one_error_line(capsys)


def test_truncated_bundle_is_one_error_line(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    out = create(tmp_path, keys)
    out.write_bytes(out.read_bytes()[:100])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 1
    assert "truncated" in one_error_line(capsys)
