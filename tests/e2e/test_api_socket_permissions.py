"""Who may use the local API is decided by the socket file's mode and group
(docs/api.md, "Permissions"): the daemon creates the socket with exactly the
configured mode and group, only in a directory nobody else can change, never
replaces anything that is not a socket, and a user outside the mode and group
cannot connect (the CLI then says so, instead of bypassing the daemon)."""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import sim
from agent.cli import main as agent_main
from tests.e2e._api import running, set_api, status_over_socket
from tests.e2e._sim import COMPATIBLE, SimDevice
from tests.e2e.conftest import Images, KeyPair

NOBODY = 65534


def as_user(uid: int, gid: int, fn: Callable[[], int]) -> tuple[int, str]:
    """Run `fn` in a forked child that is user `uid`, group `gid` and no other
    group; its exit status and what it wrote to stdout and stderr."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        rc = 99
        try:
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = sys.stderr = os.fdopen(1, "w", closefd=False)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            rc = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(rc)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        output = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def connects(path: Path) -> Callable[[], int]:
    def attempt() -> int:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
            except PermissionError:
                return 13
        return 0

    return attempt


def _other_group() -> int:
    """A group other than our own that we may give a file to."""
    if os.geteuid() == 0:
        return grp.getgrnam("daemon").gr_gid
    return next((g for g in os.getgroups() if g != os.getgid()), os.getgid())


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory outside the (private) pytest tree, traversable by every user."""
    d = Path(tempfile.mkdtemp(prefix="ota-api-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        d.rmdir()


@pytest.mark.parametrize(("mode", "expected"), [("0660", 0o660), ("0600", 0o600), (0o640, 0o640)])
def test_the_socket_has_exactly_the_configured_mode_and_group(
    device: SimDevice, mode: object, expected: int
) -> None:
    gid = _other_group()
    set_api(device, socket="agent.sock", mode=mode, group=grp.getgrgid(gid).gr_name)
    with running(device) as daemon:
        st = daemon.socket.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == expected
        assert st.st_gid == gid
        assert status_over_socket(daemon.socket)["booted"] == "A"
    assert not daemon.socket.exists()  # removed when the daemon stopped


@pytest.fixture
def open_device(open_dir: Path, images: Images, signing_key: KeyPair, capsys: pytest.CaptureFixture[str]) -> SimDevice:
    """A simulated device every user can reach (its config readable, its socket
    directory traversable): only the socket's mode and group keep them out."""
    sim.init(sim.SimSpec(open_dir / "device", images.factory.path, signing_key.public, COMPATIBLE))
    return SimDevice(open_dir / "device", capsys)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("acting as other users needs root")


def test_a_user_outside_the_mode_and_group_cannot_connect_and_one_in_the_group_can(open_device: SimDevice) -> None:
    _need_root()
    with running(open_device) as daemon:
        assert as_user(NOBODY, NOBODY, connects(daemon.socket))[0] == 13
    set_api(open_device, socket="agent.sock", group=grp.getgrgid(NOBODY).gr_name)
    with running(open_device) as daemon:
        assert as_user(NOBODY, NOBODY, connects(daemon.socket))[0] == 0
        assert as_user(NOBODY, grp.getgrnam("daemon").gr_gid, connects(daemon.socket))[0] == 13


def test_the_cli_of_a_user_who_may_not_connect_says_so_instead_of_running_standalone(
    open_device: SimDevice,
) -> None:
    _need_root()
    with running(open_device) as daemon:
        rc, output = as_user(NOBODY, NOBODY, lambda: agent_main(["-c", str(open_device.config), "status"]))
    assert rc == 1, output
    assert output == (f"ota-agent: error: permission denied connecting to the running agent at {daemon.socket}: "
                      "its mode and group decide who may use it (docs/api.md)\n")


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_socket_directory_others_can_write_is_refused(device: SimDevice, open_dir: Path, mode: int) -> None:
    shared = open_dir / "shared"
    shared.mkdir()
    shared.chmod(mode)
    set_api(device, socket=str(shared / "agent.sock"))
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "-c", str(device.config), "run"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert f"API socket directory {shared} is writable by others" in proc.stderr
    assert list(shared.iterdir()) == []


def test_a_socket_directory_that_is_a_symlink_is_refused(device: SimDevice, open_dir: Path) -> None:
    (open_dir / "real").mkdir()
    (open_dir / "link").symlink_to(open_dir / "real")
    set_api(device, socket=str(open_dir / "link" / "agent.sock"))
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "-c", str(device.config), "run"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "is a symbolic link or not a directory" in proc.stderr
    assert list((open_dir / "real").iterdir()) == []


def test_a_file_that_is_not_a_socket_is_never_replaced(device: SimDevice) -> None:
    before = (device.dir / "cmdline").read_bytes()
    set_api(device, socket="cmdline")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "-c", str(device.config), "run"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert f"{device.dir / 'cmdline'} exists and is not a socket; refusing to replace it" in proc.stderr
    assert (device.dir / "cmdline").read_bytes() == before
    assert device.agent("status").rc == 0  # the CLI finds no daemon there and runs standalone
