"""`ota-bundle create` never signs what the reader rejects and never leaves a
mess: every option is judged by the reader's own manifest rules before anything
is written (one error line naming the option, the directory unchanged); an
already-past expiry is a warning; an existing output is replaced only with
--force and never when it is an input; temporary files never appear in errors
and are gone after any failure, an interrupt included."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bundler.build import BundleSpec, build_full
from bundler.cli import main
from bundler.format.ops import Op, OpType
from bundler.format.writer import write_bundle_file
from ota_common.errors import OtaError
from tests.unit.conftest import KeyPair, manifest_for

MiB = 1 << 20


@pytest.fixture
def workdir(tmp_path: Path, signing_key: KeyPair) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    (d / "rootfs.img").write_bytes(random.Random(1).randbytes(MiB + 123) + bytes(MiB))
    (d / "appfs.img").write_bytes(random.Random(2).randbytes(300_000))
    (d / "signing.key").write_bytes(signing_key.private_path.read_bytes())
    return d


def argv(
    d: Path, options: dict[str, str] | None = None, *extra: str, image: tuple[str, ...] = ("rootfs.img",)
) -> list[str]:
    """`create` arguments for the files in `d`, each option as --name=value (a value may start with -)."""
    images = [f"--image={d / i}" if "=" not in i else "--image=" + i.replace("=", f"={d}/", 1) for i in image]
    merged = {
        "--key": str(d / "signing.key"),
        "--version": "2.1.0",
        "--security-version": "5",
        "--compatible": "acme-gw",
        "--level": "3",
        "--output": str(d / "update.otab"),
        **(options or {}),
    }
    return ["create", *images, *(f"{k}={v}" for k, v in merged.items()), *extra]


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ota-bundle: error: ")
    return lines[0]


# --- values the reader rejects -------------------------------------------------

REJECTED = [
    (("--version", "9.2 beta"), "--version: '9.2 beta' is not a valid version (1-128 of A-Z a-z 0-9 . _ + : -)"),
    (("--version", ""), "--version: '' is not a valid version"),
    (("--version", "v" * 129), "--version: 'vvvv"),
    (("--version", "-rc1"), "--version: '-rc1' is not a valid version"),
    (("--version", "1.0\n"), "--version: '1.0\\n' is not a valid version"),
    (("--security-version", "-1"), "--security-version: -1 is not a valid security version"),
    (("--security-version", str(1 << 63)), f"--security-version: {1 << 63} is not a valid security version"),
    (("--compatible", "acme gw"), "--compatible: 'acme gw' is not a valid compatible string"),
    (("--compatible", "x" * 1_000_000), "--compatible: 'xxxx"),
    (("--slot-class", "root fs"), "--slot-class: 'root fs' is not a valid slot class"),
    (("--expires", "2027-01-01T00:00:00"), "--expires: '2027-01-01T00:00:00' is not an ISO 8601 time with a zone"),
    (("--expires", "next tuesday"), "--expires: 'next tuesday' is not an ISO 8601 time"),
    (("--level", "0"), "--level: 0 is not a zstd level"),
    (("--level", "99"), "--level: 99 is not a zstd level"),
]


@pytest.mark.parametrize(("option", "message"), REJECTED, ids=[f"{o[0]}={o[1][:12]!r}" for o, _ in REJECTED])
def test_create_refuses_a_value_the_reader_rejects_naming_the_option_and_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], option: tuple[str, str], message: str
) -> None:
    before = listing(workdir)
    assert main(argv(workdir, dict([option]))) == 1
    line = one_error_line(capsys)
    assert message in line
    assert len(line) < 700, "a huge value is cut, not echoed"
    assert listing(workdir) == before, "no output and no temporary file"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (("ap p=appfs.img",), "--image: 'ap p' is not a valid slot class"),
        (("=appfs.img",), "--image: '' is not a valid slot class"),
        (("rootfs=rootfs.img", "rootfs=appfs.img"), "two images for slot class 'rootfs'"),
        (("rootfs.img", "rootfs=appfs.img"), "two images for slot class 'rootfs'"),
        (("missing.img",), "missing.img: No such file or directory"),
        (("rootfs=.",), "not a regular file"),
        (tuple(f"c{i}=appfs.img" for i in range(17)), "17 images given; a bundle holds 1 to 16"),
    ],
)
def test_create_refuses_bad_image_lists_and_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], image: tuple[str, ...], message: str
) -> None:
    before = listing(workdir)
    assert main(argv(workdir, image=image)) == 1
    assert message in one_error_line(capsys)
    assert listing(workdir) == before


@pytest.mark.parametrize(("kind", "message"), [("fifo", "not a regular file"), ("missing", "No such file")])
def test_a_key_that_is_not_a_readable_regular_file_is_refused_without_blocking(
    workdir: Path, capsys: pytest.CaptureFixture[str], kind: str, message: str
) -> None:
    key = workdir / "key.pem"
    if kind == "fifo":
        os.mkfifo(key)
    before = listing(workdir) if kind != "fifo" else None
    assert main(argv(workdir, {"--key": str(key)})) == 1
    assert f"--key: {key}: {message}" in one_error_line(capsys)
    if before is not None:
        assert listing(workdir) == before


def test_slot_class_without_a_plain_image_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv(workdir, {"--slot-class": "system"}, image=("rootfs=rootfs.img",))) == 1
    assert "--slot-class: applies only to a plain --image PATH" in one_error_line(capsys)


def test_an_empty_image_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "empty.img").write_bytes(b"")
    assert main(argv(workdir, image=("empty.img",))) == 1
    assert "--image: " in one_error_line(capsys)


# --- expiry ------------------------------------------------------------------


def test_an_already_past_expiry_is_a_warning_and_the_bundle_is_built(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv(workdir, {"--expires": "2020-01-01T00:00:00Z"})) == 0
    err = capsys.readouterr().err
    assert "ota-bundle: warning: --expires 2020-01-01T00:00:00Z is already past" in err
    assert main(["inspect", str(workdir / "update.otab"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expires"] == "2020-01-01T00:00:00Z"


def test_a_future_expiry_gives_no_warning(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    future = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert main(argv(workdir, {"--expires": future})) == 0
    assert "warning" not in capsys.readouterr().err


# --- the output ----------------------------------------------------------------


def test_an_existing_output_is_kept_unless_force(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "update.otab").write_bytes(b"last week's bundle")
    before = listing(workdir)
    assert main(argv(workdir)) == 1
    assert f"-o: {workdir / 'update.otab'} exists (use --force to replace it)" in one_error_line(capsys)
    assert listing(workdir) == before
    assert main(argv(workdir, None, "--force")) == 0
    assert (workdir / "update.otab").read_bytes()[:5] == b"\x89OTAB"
    assert sorted(listing(workdir)) == sorted(before), "no temporary file left beside the output"


@pytest.mark.parametrize("victim", ["signing.key", "rootfs.img"])
def test_the_output_is_never_an_input_even_with_force(
    workdir: Path, capsys: pytest.CaptureFixture[str], victim: str
) -> None:
    before = listing(workdir)
    assert main(argv(workdir, {"--output": str(workdir / victim)}, "--force")) == 1
    assert "is also an input" in one_error_line(capsys)
    assert listing(workdir) == before


def test_an_output_directory_that_does_not_exist_is_named_not_a_temporary_file(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv(workdir, {"--output": str(workdir / "no" / "such" / "update.otab")})) == 1
    line = one_error_line(capsys)
    assert f"directory {workdir / 'no' / 'such'} does not exist" in line
    assert ".part" not in line
    assert ".payload" not in line


def test_an_output_that_appears_while_building_is_not_clobbered_and_nothing_is_left(
    workdir: Path, signing_key: KeyPair
) -> None:
    out = workdir / "update.otab"
    spec = BundleSpec(workdir / "rootfs.img", signing_key.private_path, "1.0", 1, "board", level=1, threads=1)

    def someone_else_writes(done: int, total: int) -> None:
        if done == total:
            out.write_bytes(b"another build's bundle")

    with pytest.raises(OtaError) as caught:
        build_full(spec, out, someone_else_writes)
    assert str(caught.value) == f"-o: {out} appeared while building (use --force to replace it)"
    assert out.read_bytes() == b"another build's bundle"
    assert sorted(p.name for p in workdir.iterdir()) == ["appfs.img", "rootfs.img", "signing.key", "update.otab"]


def test_an_interrupt_while_reading_the_image_leaves_nothing(workdir: Path, signing_key: KeyPair) -> None:
    before = listing(workdir)
    spec = BundleSpec(workdir / "rootfs.img", signing_key.private_path, "1.0", 1, "board", level=1, threads=2)

    def ctrl_c(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_full(spec, workdir / "update.otab", ctrl_c)
    assert listing(workdir) == before


def test_an_interrupt_after_the_bundle_is_written_removes_the_temporary_file(
    workdir: Path, signing_key: KeyPair
) -> None:
    before = listing(workdir)
    seen: list[Path] = []

    def ctrl_c(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.exists()
        raise KeyboardInterrupt

    ops = [Op(OpType.ZERO, 0, 4096)]
    out = workdir / "update.otab"
    with pytest.raises(KeyboardInterrupt):
        write_bundle_file(out, manifest_for(ops, 0), ops, io.BytesIO(), [signing_key.key], check=ctrl_c)
    assert seen, "the check ran on the written temporary file"
    assert listing(workdir) == before


def test_ctrl_c_on_the_command_line_exits_130_with_one_line_and_leaves_nothing(
    workdir: Path, signing_key: KeyPair
) -> None:
    (workdir / "big.img").write_bytes(random.Random(3).randbytes(24 * MiB))
    before = sorted(p.name for p in workdir.iterdir())
    proc = subprocess.Popen(
        [sys.executable, "-m", "bundler.cli", *argv(workdir, {"--level": "19"}, image=("big.img",))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()  # "bundling: 25%": the payload spool is being written
    assert first.startswith("bundling:"), first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["ota-bundle: error: interrupted; nothing was written"]
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_the_bundle_is_readable_by_everyone_the_umask_allows(workdir: Path) -> None:
    assert main(argv(workdir)) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert (workdir / "update.otab").stat().st_mode & 0o777 == 0o666 & ~umask, "a bundle is public, not 0600"
