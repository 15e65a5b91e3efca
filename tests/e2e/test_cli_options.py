"""The ota-agent command line itself: `-c` before or after the command's name,
`--version` from the package metadata, `--json` on every command that reports
(one JSON object on stdout, nothing else; an error as one JSON object on
stderr), and install progress that names its phase and counts to the image
size (on a terminal and in a log)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, Images, KeyPair


def test_config_option_works_after_the_command_name(device: SimDevice, make_bundle: BundleFactory) -> None:
    config = str(device.config)
    run = device.run("install", str(make_bundle("2.0")), "-c", config)
    assert run.rc == 0, run.err
    run = device.run("status", "--config", config, "--json")
    assert run.rc == 0, run.err
    assert json.loads(run.out)["primary"] == "B"
    assert device.run("mark-bad", "-c", config, "other").rc == 0
    assert device.run("mark-good", "other", "-c", config).rc == 0
    run = device.run("boot-check", "-c", config, "--no-reboot")
    assert run.rc == 0, run.out + run.err
    assert device.run("-c", config, "status").rc == 0  # before it, as always


def test_config_after_the_command_wins_over_one_before_it(device: SimDevice, tmp_path: Path) -> None:
    run = device.run("-c", str(tmp_path / "absent.toml"), "status", "-c", str(device.config))
    assert run.rc == 0, run.err


def test_version_comes_from_the_package_metadata() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ota-agent {importlib.metadata.version('edge-ota')}"


def test_sim_init_keeps_its_own_version_option(tmp_path: Path, images: Images, signing_key: KeyPair) -> None:
    d = tmp_path / "dev"
    argv = ["sim", "init", str(d), "--image", str(images.factory.path), "--keyring", str(signing_key.public)]
    assert main([*argv, "--compatible", "board", "--version", "1.4"]) == 0
    assert main(["-c", str(d / "agent.toml"), "status"]) == 0
    assert '"version": "1.4"' in (d / "state" / "state.json").read_text()


def one_json_object(out: str) -> dict[str, Any]:
    lines = out.splitlines()
    assert len(lines) == 1, out
    doc: dict[str, Any] = json.loads(lines[0])
    return doc


def test_every_reporting_command_prints_one_json_object_and_nothing_on_stderr(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    run = device.install(make_bundle("2.0", security_version=3), "--json")
    assert (run.rc, run.err) == (0, "")
    doc = one_json_object(run.out)
    assert (doc["result"], doc["slot"], doc["bundle_version"], doc["security_version"]) == ("ok", "B", "2.0", 3)
    assert doc["reboot_to_try"] is True

    run = device.agent("boot-check", "--json")
    assert (run.rc, run.err) == (0, "")
    doc = one_json_object(run.out)
    assert (doc["outcome"], doc["slot"], doc["booted_good"], doc["reboot_needed"]) == ("pending", "A", True, False)

    run = device.agent("mark-bad", "other", "--json")
    assert (run.rc, run.err) == (0, "")
    doc = one_json_object(run.out)
    assert (doc["slot"], doc["verdict"], doc["committed"]) == ("B", "bad", False)

    run = device.agent("mark-good", "other", "--json")
    assert (run.rc, run.err) == (0, "")
    assert one_json_object(run.out)["verdict"] == "good"

    run = device.agent("status", "--json")
    assert (run.rc, run.err) == (0, "")
    assert json.loads(run.out)["slots"]["B"]["boot_state"] == "good"


@pytest.mark.parametrize(
    ("argv", "kind", "message"),
    [
        (("install", "/nonexistent/bundle.otab"), "SourceError", "cannot open"),
        (("mark-good", "C"), "MarkError", "unknown slot 'C'"),
        (("boot-check",), "BootEnvError", "no ota.slot="),
    ],
)
def test_errors_under_json_are_one_json_object_on_stderr(
    device: SimDevice, argv: tuple[str, ...], kind: str, message: str
) -> None:
    if argv == ("boot-check",):
        (device.dir / "cmdline").write_text("quiet\n")
    run = device.agent(*argv, "--json")
    assert run.rc == 1
    assert run.out == ""
    doc = one_json_object(run.err)
    assert doc["program"] == "ota-agent"
    assert doc["error"]["type"] == kind
    assert message in doc["error"]["message"]


def test_config_errors_under_json_are_one_json_object_on_stderr(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--json", "-c", str(tmp_path / "absent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert json.loads(proc.stderr)["error"]["type"] == "ConfigError"


def install_in_a_process(device: SimDevice, bundle: Path, *, stderr_tty: bool) -> str:
    """Run the install as its own process; stderr a pipe or a pseudo-terminal. Returns stderr."""
    cmd = [sys.executable, "-m", "agent.cli", "-c", str(device.config), "install", str(bundle)]
    if not stderr_tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    controller, terminal = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # EIO: the terminal side closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=terminal, timeout=120, check=False)
    finally:
        os.close(terminal)
        reader.join(timeout=30)
        os.close(controller)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_in_a_log_names_each_phase_and_counts_each_to_the_image_size(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    err = install_in_a_process(device, make_bundle("2.0"), stderr_tty=False)
    progress = [line.rpartition(": ") for line in err.splitlines() if line.endswith("%")]
    phases = [label for label, _, _ in progress]
    assert phases == sorted(phases, key=["writing", "verifying read-back"].index), err
    for phase in ("writing", "verifying read-back"):
        percents = [int(p.rstrip("%")) for label, _, p in progress if label == phase]
        assert percents == sorted(percents), err  # each phase counts up once ...
        assert percents[-1] == 100, err  # ... to 100 % of the image size


def test_progress_on_a_terminal_totals_the_image_size_not_twice_it(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    out = install_in_a_process(device, make_bundle("2.0"), stderr_tty=True)
    size = f"/{images.v2.size / (1 << 20):.1f} MiB"
    finals = [draw for draw in out.replace("\n", "\r").split("\r") if "100.0%" in draw]
    assert [d.split(" [")[0] for d in finals] == ["writing", "verifying read-back"], out
    assert all(size in d for d in finals), finals
