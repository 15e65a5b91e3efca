"""The agent's own files are never written through a planted link and never
block on a FIFO: a symlink at a temp name, at state.json, the outbox, the lock
or the simulated bootloader's file, pointing at a slot, leaves the slot
byte-for-byte as it was; a FIFO as state.json, outbox, bootloader file, config
or keyring entry is a clear error at once (run in a subprocess with a hang
guard: today's code would block forever). A state directory that others can
write, or that the agent does not own, is refused with the fix in the message."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e._sim import SimDevice, sha256_file

REPO = Path(__file__).resolve().parents[2]
HANG_GUARD = 60  # seconds; only a hang gets near it


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv],
        capture_output=True, text=True, timeout=HANG_GUARD, cwd=REPO, check=False,
    )


def test_links_planted_at_temp_names_are_not_written_through(
    device: SimDevice, make_bundle: Callable[..., Path]
) -> None:
    slot_a = device.slot_path("A")
    before = device.snapshot().slot("A")
    planted = [device.dir / "state" / ".state.json.tmp", device.dir / ".bootloader.json.tmp",
               device.dir / "state" / ".outbox.log.tmp", device.dir / ".cmdline.tmp"]
    for p in planted:
        p.symlink_to(slot_a)
    device.install_ok(make_bundle("2.0"))
    device.boot()
    assert device.status()["booted"] == "B"
    assert device.snapshot().slot("A") == before
    assert all(p.is_symlink() for p in planted)  # names we never use, left alone


REFUSED_FILES = ["state/lock", "bootloader.json"]  # the device cannot work around these: a clear error
SET_ASIDE_FILES = ["state/state.json", "state/outbox.log"]  # renamed away unread; the device keeps working


@pytest.mark.parametrize("name", REFUSED_FILES)
def test_lock_or_bootloader_file_replaced_by_a_link_to_a_slot_is_refused_and_both_slots_untouched(
    device: SimDevice, make_bundle: Callable[..., Path], name: str
) -> None:
    device.agent("status")  # creates the lock and outbox files
    planted = device.dir / name
    planted.unlink(missing_ok=True)
    planted.symlink_to(device.slot_path("A"))
    before = device.snapshot()
    install = device.install(make_bundle("2.0"))
    status = device.agent("status")
    assert "Traceback" not in install.err + status.err
    assert "is a symbolic link; refusing to follow it" in install.err + status.err
    assert device.snapshot().slot("A") == before.slot("A")
    assert device.snapshot().slot("B") == before.slot("B")


@pytest.mark.parametrize("name", SET_ASIDE_FILES)
def test_state_or_outbox_replaced_by_a_link_to_a_slot_is_set_aside_unfollowed_and_install_works(
    device: SimDevice, make_bundle: Callable[..., Path], name: str
) -> None:
    device.agent("status")
    planted = device.dir / name
    planted.unlink(missing_ok=True)
    planted.symlink_to(device.slot_path("A"))
    booted_before = device.snapshot().slot("A")
    install = device.install(make_bundle("2.0"))
    assert install.rc == 0, install.err
    assert "Traceback" not in install.err
    assert "symbolic link" in install.err
    assert not planted.is_symlink()
    assert device.snapshot().slot("A") == booted_before
    assert device.status()["slots"]["B"]["boot_state"] == "trial"


def _fifo_at(device: SimDevice, name: str) -> Path:
    path = device.dir / name
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("name", "command", "rc"),
    [
        ("state/state.json", "status", 0),  # set aside, unread: the device keeps working
        ("bootloader.json", "status", 1),
        ("state/outbox.log", "install", 0),
        ("keys/evil.pub", "install", 1),
        ("agent.toml", "status", 1),
    ],
)
def test_fifo_where_a_regular_file_belongs_is_a_clear_error_not_a_hang(
    device: SimDevice, make_bundle: Callable[..., Path], name: str, command: str, rc: int
) -> None:
    bundle = make_bundle("2.0")
    device.agent("status")
    before_a = sha256_file(device.slot_path("A"))
    fifo = _fifo_at(device, name)
    argv = ["-c", str(device.config), command] + ([str(bundle)] if command == "install" else [])
    r = cli(*argv)
    assert r.returncode == rc, r.stderr
    assert "Traceback" not in r.stderr
    assert "FIFO" in r.stderr, r.stderr
    assert (str(fifo) if rc else fifo.name) in r.stderr
    assert sha256_file(device.slot_path("A")) == before_a  # (a snapshot would read the FIFO)


def test_group_or_world_writable_state_dir_is_refused_with_the_fix(device: SimDevice) -> None:
    state = device.dir / "state"
    for mode in (0o777, 0o770, 0o702):
        state.chmod(mode)
        line = device.agent("status").one_error_line()
        assert str(state) in line
        assert "writable by group or others" in line
        assert f"chmod go-w '{state}'" in line
    state.chmod(0o700)
    assert device.agent("status").rc == 0


def test_state_dir_owned_by_someone_else_is_refused_with_the_fix(device: SimDevice) -> None:
    state = device.dir / "state"
    os.chown(state, 4242, -1)
    line = device.agent("status").one_error_line()
    assert "owned by uid 4242" in line
    assert f"chown {os.geteuid()} '{state}'" in line


def test_missing_state_dir_is_created_private(device: SimDevice) -> None:
    state = device.dir / "state"
    shutil.rmtree(state)
    assert device.agent("status").rc == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_state_dir_that_is_a_file_is_refused(device: SimDevice) -> None:
    state = device.dir / "state"
    shutil.rmtree(state)
    state.write_text("not a directory")
    line = device.agent("status").one_error_line()
    assert "not a directory" in line
