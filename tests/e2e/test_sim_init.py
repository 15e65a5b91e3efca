"""`ota-agent sim init`: a simulated device is created whole and usable, or
refused with one clear line before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from tests.e2e._sim import ERROR_PREFIX, SLOT_SIZE, Run
from tests.e2e.conftest import Images, KeyPair


def sim_init(capsys: pytest.CaptureFixture[str], directory: Path, images: Images, key: KeyPair, *extra: str) -> Run:
    argv = ["sim", "init", str(directory), "--image", str(images.factory.path), "--keyring", str(key.public)]
    argv += ["--slot-size", str(SLOT_SIZE), *extra]
    capsys.readouterr()
    rc = agent_main(argv)
    out, err = capsys.readouterr()
    return Run(rc, out, err)


def test_sim_init_creates_a_device_with_both_slots_holding_the_image_and_a_booted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: Images, signing_key: KeyPair
) -> None:
    d = tmp_path / "dev"
    run = sim_init(capsys, d, images, signing_key, "--compatible", "board-1", "--tries", "5")
    assert run.rc == 0, run.err
    capsys.readouterr()
    assert agent_main(["-c", str(d / "agent.toml"), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["booted"], doc["primary"], doc["compatible"]) == ("A", "A", "board-1")
    for name in ("A", "B"):
        assert doc["slots"][name]["boot_state"] == "good"
        assert doc["slots"][name]["sha256"] == images.factory.sha256
        assert (d / f"slot-{name}.img").stat().st_size == SLOT_SIZE
    assert "tries = 5" in (d / "agent.toml").read_text()


def test_sim_init_refuses_a_directory_that_already_holds_a_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: Images, signing_key: KeyPair
) -> None:
    d = tmp_path / "dev"
    assert sim_init(capsys, d, images, signing_key, "--compatible", "board-1").rc == 0
    config = (d / "agent.toml").read_bytes()
    line = sim_init(capsys, d, images, signing_key, "--compatible", "board-2").one_error_line()
    assert "already holds a simulated device" in line
    assert (d / "agent.toml").read_bytes() == config


@pytest.mark.parametrize("tries", ["0", "16"])
def test_sim_init_refuses_out_of_range_tries_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: Images, signing_key: KeyPair, tries: str
) -> None:
    d = tmp_path / "dev"
    line = sim_init(capsys, d, images, signing_key, "--compatible", "board-1", "--tries", tries).one_error_line()
    assert "tries" in line
    assert "1..15" in line
    assert not d.exists()


def test_sim_init_writes_a_loadable_config_whatever_the_compatible_string(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: Images, signing_key: KeyPair
) -> None:
    d = tmp_path / "dev"
    odd = 'board "rev\\2"'
    assert sim_init(capsys, d, images, signing_key, "--compatible", odd).rc == 0
    capsys.readouterr()
    rc = agent_main(["-c", str(d / "agent.toml"), "status", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert not [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert json.loads(out)["compatible"] == odd
