"""`ota-bundle` driven in-process through bundler.cli.main(argv): keygen,
create, inspect, verify, --version, --json (one object on stdout; errors one
object on stderr), bundles signed by several keys and holding several images;
errors are one line on stderr, exit code 1, no traceback."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import stat
from pathlib import Path

import pytest

from bundler.cli import main
from bundler.format.header import HEADER_SIZE
from bundler.format.signing import key_id, load_public_key

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


# --- --version, --json ------------------------------------------------------


def test_version_prints_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ota-bundle {importlib.metadata.version('edge-ota')}"


def test_create_json_is_one_object_on_stdout_and_nothing_on_stderr(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    out = create(tmp_path, keys, "--json")
    stdout, stderr = capsys.readouterr()
    assert stderr == "", "no progress lines under --json"
    doc = json.loads(stdout)
    assert doc["output"] == str(out)
    assert (doc["bundle_version"], doc["security_version"], doc["compatible"]) == ("2.1.0", 5, "acme-gw")
    assert doc["bundle_size"] == out.stat().st_size
    assert doc["image_size"] == len(image)
    assert [i["slot_class"] for i in doc["images"]] == ["rootfs"]
    assert doc["images"][0]["sha256"] == hashlib.sha256(image).hexdigest()
    assert len(doc["signers"]) == 1
    assert doc["warnings"] == []


def test_verify_json_reports_the_signer_and_every_image(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    out = create(tmp_path, keys)
    capsys.readouterr()
    assert main(["verify", str(out), "--keyring", str(keys), "--json"]) == 0
    stdout, stderr = capsys.readouterr()
    assert stderr == ""
    doc = json.loads(stdout)
    assert doc["ok"] is True
    assert doc["expired"] is False
    assert doc["signatures"] == [{"key_id": doc["signer"], "algorithm": 1, "in_keyring": True}]
    assert doc["images"] == [{"slot_class": "rootfs", "size": len(image), "sha256": hashlib.sha256(image).hexdigest()}]


def json_error(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    doc = json.loads(lines[0])
    assert doc["program"] == "ota-bundle"
    error: dict[str, str] = doc["error"]
    return error


def test_errors_under_json_are_one_json_object_on_stderr(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    out = create(tmp_path, keys)
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out), "--keyring", str(keys), "--json"]) == 1
    assert json_error(capsys)["type"] == "HashMismatchError"
    assert main(["inspect", str(tmp_path / "rootfs.img"), "--json"]) == 1
    assert "bad magic" in json_error(capsys)["message"]
    argv = ["create", "--json", "--image", str(tmp_path / "rootfs.img"), "--key", str(keys / "signing.key")]
    assert main([*argv, "--version", "9.2 beta", "--security-version", "1", "--compatible", "b", "-o", str(out)]) == 1
    error = json_error(capsys)
    assert error == {"type": "OptionError", "message": error["message"]}
    assert error["message"].startswith("--version: '9.2 beta' is not a valid version")
    assert main([*argv, "--version", "1"]) == 2, "a usage error"
    assert "the following arguments are required" in json_error(capsys)["message"]


def test_a_past_expiry_under_json_is_a_json_warning_and_listed_in_the_report(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    create(tmp_path, keys, "--json", "--expires", "2001-01-01T00:00:00Z")
    stdout, stderr = capsys.readouterr()
    (warning,) = [json.loads(line) for line in stderr.splitlines()]
    assert "already past" in warning["warning"]["message"]
    assert json.loads(stdout)["warnings"] == [warning["warning"]["message"]]


# --- several keys -------------------------------------------------------------


def key_id_of(pub: Path) -> str:
    return key_id(load_public_key(pub)).hex()


def test_a_bundle_signed_by_several_keys_shows_every_signer_and_each_key_alone_verifies_it(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    new = tmp_path / "new"
    stranger = tmp_path / "stranger"
    assert main(["keygen", str(new)]) == 0
    assert main(["keygen", str(stranger)]) == 0
    out = create(tmp_path, keys, "--key", str(new / "signing.key"))
    ids = [key_id_of(keys / "signing.pub"), key_id_of(new / "signing.pub")]
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert [s["key_id"] for s in json.loads(capsys.readouterr().out)["signatures"]] == ids
    for trusted, kid in zip([keys, new], ids, strict=True):
        assert main(["verify", str(out), "--keyring", str(trusted / "signing.pub"), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["signer"] == kid
        assert [s["in_keyring"] for s in doc["signatures"]] == [s == kid for s in ids]
        assert main(["verify", str(out), "--keyring", str(trusted / "signing.pub")]) == 0
        line = capsys.readouterr().out
        assert f"signed by key {kid[:16]}" in line
        assert all(i[:16] in line for i in ids), "the text report names every signer"
    assert main(["verify", str(out), "--keyring", str(stranger / "signing.pub")]) == 1
    line = one_error_line(capsys)
    assert all(i[:16] in line for i in ids)


def test_more_keys_than_the_format_holds_or_the_same_key_twice_is_refused(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["create", "--image", str(tmp_path / "rootfs.img"), "--version", "1", "--security-version", "1"]
    base += ["--compatible", "b", "-o", str(tmp_path / "out.otab")]
    key = ["--key", str(keys / "signing.key")]
    assert main([*base, *key, *key]) == 1
    assert f"--key: {keys / 'signing.key'} is the same key as" in one_error_line(capsys)
    many = []
    for i in range(17):
        assert main(["keygen", str(tmp_path / f"k{i}")]) == 0
        many += ["--key", str(tmp_path / f"k{i}" / "signing.key")]
    capsys.readouterr()
    assert main([*base, *many]) == 1
    assert "--key: 17 keys given; a bundle carries 1 to 16 signatures" in one_error_line(capsys)
    assert main([*base, *many[:32]]) == 0, "16 signatures are allowed"
    assert main(["verify", str(tmp_path / "out.otab"), "--keyring", str(tmp_path / "k15" / "signing.pub")]) == 0


# --- several images -------------------------------------------------------------


def test_several_images_go_into_one_bundle_each_with_a_contiguous_op_range(
    tmp_path: Path, keys: Path, image: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    appfs = random.Random(9).randbytes(70_000) + bytes(2 * MiB)
    (tmp_path / "appfs.img").write_bytes(appfs)
    out = tmp_path / "update.otab"
    argv = ["create", "--image", f"rootfs={tmp_path / 'rootfs.img'}", "--image", f"appfs={tmp_path / 'appfs.img'}"]
    argv += ["--key", str(keys / "signing.key"), "--version", "3.0", "--security-version", "1", "--compatible", "b"]
    assert main([*argv, "-o", str(out), "--level", "3"]) == 0
    assert "2 images (rootfs" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rootfs, app = info["images"]
    assert (rootfs["slot_class"], rootfs["size"], rootfs["sha256"]) == (
        "rootfs", len(image), hashlib.sha256(image).hexdigest()
    )
    assert (app["slot_class"], app["size"], app["sha256"]) == ("appfs", len(appfs), hashlib.sha256(appfs).hexdigest())
    assert app["op_first"] == rootfs["op_first"] + rootfs["op_count"]
    ops = info["operations"]
    assert app["op_first"] + app["op_count"] == len(ops)
    assert [op["type"] for op in ops[app["op_first"] :]] == ["REPLACE", "ZERO"]
    assert ops[app["op_first"]]["dst_offset"] == 0, "each image's extents start at its own offset 0"
    assert main(["verify", str(out), "--keyring", str(keys)]) == 0
    assert "2 image hash(es) verified" in capsys.readouterr().out
