"""`mark-good` of a slot that is not booted makes it committed and the fallback
target, so it is refused when the slot's content is not known complete and
verified: its last install failed or was interrupted (the slot record was
cleared, or an unfinished install's trial names it). The refusal says why and
how to force it, and changes nothing. `--force` marks it good anyway, and the
next boot-check does not undo the operator's decision."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e._procs import killed_at
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


def failed_install(device: SimDevice, make_bundle: BundleFactory, tmp_path: Path) -> None:
    data = make_bundle("2.0").read_bytes()
    cut = tmp_path / "cut.otab"
    cut.write_bytes(data[: len(data) - 1])  # fails at the last payload byte: B partly written, marked bad
    assert device.install(cut).rc == 1


def interrupted_install(device: SimDevice, make_bundle: BundleFactory, tmp_path: Path) -> None:
    killed_at("mid-payload", device, "install", str(make_bundle("2.0")))


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        (failed_install, "its last install failed or was interrupted, so its content is unknown"),
        (interrupted_install, "an install of version 2.0 into it did not finish (failed or interrupted)"),
    ],
)
@pytest.mark.parametrize("which", ["other", "B"])
def test_mark_good_refuses_a_half_written_slot_and_changes_nothing(
    device: SimDevice,
    make_bundle: BundleFactory,
    tmp_path: Path,
    broken: Callable[[SimDevice, BundleFactory, Path], None],
    why: str,
    which: str,
) -> None:
    broken(device, make_bundle, tmp_path)
    before = device.snapshot()
    line = device.agent("mark-good", which).one_error_line()
    assert f"refusing to mark slot B good: {why}" in line
    assert "half-written" in line
    assert "pass --force if you know it holds a complete image" in line
    after = device.snapshot()
    assert after.bootloader == before.bootloader
    assert after.small == before.small
    assert device.boot().out.splitlines()[-1] == "settled on slot A after 1 boot(s)"
    assert device.status()["slots"]["B"]["boot_state"] == "bad"


def test_mark_good_refusal_under_json_is_one_json_error_on_stderr(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    failed_install(device, make_bundle, tmp_path)
    run = device.agent("mark-good", "other", "--json")
    assert run.rc == 1
    assert run.out == ""
    [line] = run.err.splitlines()
    error = json.loads(line)["error"]
    assert error["type"] == "MarkError"
    assert "--force" in error["message"]


def test_mark_good_force_marks_an_interrupted_slot_good_and_the_next_boot_check_keeps_it(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    interrupted_install(device, make_bundle, tmp_path)
    run = device.agent("mark-good", "other", "--force")
    assert run.rc == 0, run.err
    doc = device.status()
    assert doc["slots"]["B"]["boot_state"] == "good"
    assert doc["trial"] is None
    assert "with --force although" in doc["last_result"]["reason"]
    device.boot()
    doc = device.status()
    assert (doc["booted"], doc["slots"]["B"]["boot_state"]) == ("A", "good")


def test_mark_good_accepts_a_slot_whose_verified_image_failed_its_trial(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    """Rolled back, but its content is complete and verified: the operator may overrule."""
    device.install_ok(make_bundle("2.0"))
    device.boot("fail")
    assert device.status()["slots"]["B"]["boot_state"] == "bad"
    run = device.agent("mark-good", "other")
    assert run.rc == 0, run.err
    assert device.status()["slots"]["B"]["boot_state"] == "good"
