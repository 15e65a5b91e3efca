"""The agent's own files are opened safely (ota_common.fsutil and every reader that
uses it): no write through a link planted at a temp name or at the file itself,
no open of a FIFO, device or directory where a regular file belongs (refused
before it can block: a SIGALRM guard turns a regression into a failure, not a
hung suite), exact modes, and temp files a power cut left are cleaned up while
a live writer's temp file is not."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.events import Event
from agent.outbox import EventLog
from agent.state import AgentState, StateStore
from bundler.format.signing import KeyFileError, Keyring, generate_key
from hw.bootloader.bls import BlsEnv
from hw.bootloader.grubenv import GrubEnvError, read_block
from hw.bootloader.simenv import SimEnv
from hw.bootloader.uboot_env import UBootEnvStore
from hw.errors import BootEnvError
from ota_common import fsutil
from ota_common.fsutil import UnsafeFileError, atomic_write, open_regular, read_regular


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("blocked on open: a FIFO was opened")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file standing for a slot: nothing may change it."""
    p = tmp_path / "slot-A.img"
    p.write_bytes(b"slot contents " * 1000)
    return p


def test_atomic_write_skips_a_link_planted_at_its_temp_name_and_removes_it(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    tokens = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(fsutil.secrets, "token_hex", lambda n: next(tokens))
    planted = tmp_path / ".state.json.aaaaaaaaaaaa.tmp"
    planted.symlink_to(victim)
    before = victim.read_bytes()
    atomic_write(target, b"{}\n")
    assert target.read_bytes() == b"{}\n"
    assert victim.read_bytes() == before
    assert not planted.is_symlink()  # the planted link itself was unlinked, not followed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot-A.img", "state.json"]


def test_atomic_write_replaces_a_symlink_at_the_target_instead_of_writing_through_it(
    tmp_path: Path, victim: Path
) -> None:
    target = tmp_path / "state.json"
    target.symlink_to(victim)
    before = victim.read_bytes()
    atomic_write(target, b"new\n")
    assert not target.is_symlink()
    assert target.read_bytes() == b"new\n"
    assert victim.read_bytes() == before


def test_atomic_write_sets_the_exact_mode_and_leaves_no_temp_on_failure(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "env", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "env").stat().st_mode) == 0o644
    blocker = tmp_path / "dir"
    (blocker / "child").mkdir(parents=True)
    with pytest.raises(OSError, match="directory"):
        atomic_write(blocker, b"x")  # rename over a non-empty directory fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "env"]


def test_stray_temps_are_removed_but_a_live_writers_temp_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "grubenv"
    stale = tmp_path / ".grubenv.0123456789ab.tmp"  # a power cut between write and rename
    stale.write_bytes(b"half")
    live = tmp_path / ".grubenv.ba9876543210.tmp"
    live.write_bytes(b"in progress")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what atomic_write holds while it writes
    try:
        atomic_write(target, b"new")
    finally:
        os.close(fd)
    assert not stale.exists()
    assert live.read_bytes() == b"in progress"


def test_open_regular_refuses_links_fifos_directories_and_devices(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(victim)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "would-be-created")
    cases = [
        (link, os.O_RDONLY, "symbolic link"),
        (link, os.O_WRONLY | os.O_TRUNC, "symbolic link"),
        (dangling, os.O_WRONLY | os.O_CREAT, "symbolic link"),
        (fifo, os.O_RDONLY, "a FIFO"),
        (fifo, os.O_WRONLY, "a FIFO"),
        (tmp_path, os.O_RDONLY, "a directory"),
        (Path("/dev/null"), os.O_RDONLY, "a character device"),
    ]
    before = victim.read_bytes()
    for path, flags, what in cases:
        with pytest.raises(UnsafeFileError, match=what) as info:
            open_regular(path, flags)
        assert info.value.filename == str(path)
    assert victim.read_bytes() == before
    assert not (tmp_path / "would-be-created").exists()


def test_read_regular_reads_at_most_the_limit(tmp_path: Path) -> None:
    p = tmp_path / "big"
    p.write_bytes(b"x" * 5000)
    assert read_regular(p, 4097) == b"x" * 4097
    assert read_regular(p, 10_000) == b"x" * 5000


# --- the readers that use them ------------------------------------------------------


def test_a_linked_or_fifo_state_file_is_set_aside_unfollowed_and_a_linked_lock_refused(
    tmp_path: Path, victim: Path
) -> None:
    store = StateStore(tmp_path / "state")
    store.save(AgentState(committed_security_version=3))
    before = victim.read_bytes()
    store.path.unlink()
    store.path.symlink_to(victim)
    assert store.load().committed_security_version == 3  # kept by the floor file; the link never read
    assert victim.read_bytes() == before
    assert any(p.is_symlink() for p in store.dir.glob("state.json.corrupt-*"))
    store.path.unlink()
    os.mkfifo(store.path)
    assert store.load().committed_security_version == 3  # a FIFO is set aside at once, never blocked on
    assert not store.path.is_fifo()
    (store.dir / "lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=r"lock: cannot open the state lock: is a symbolic link"), store.lock():
        pass
    assert victim.read_bytes() == before


def test_a_linked_outbox_is_set_aside_never_written_through(tmp_path: Path, victim: Path) -> None:
    log = EventLog(tmp_path)
    log.outbox.path.symlink_to(victim)
    before = victim.read_bytes()
    log.emit(Event(event="install", result="started"))
    assert victim.read_bytes() == before
    assert not log.outbox.path.is_symlink()
    assert [r.event.result for r in log.outbox.pending()][-1] == "started"


def test_keyring_refuses_a_fifo_or_directory_named_pub_at_once(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    _, pub = generate_key(tmp_path / "gen")
    keys.mkdir()
    (keys / "good.pub").write_bytes(pub.read_bytes())
    (keys / "linked.pub").symlink_to(pub)  # a link to a regular key is fine
    assert len(Keyring.load(keys).keys) == 1
    os.mkfifo(keys / "evil.pub")
    with pytest.raises(KeyFileError, match=r"evil.pub: is a FIFO, not a regular key file"):
        Keyring.load(keys)
    (keys / "evil.pub").unlink()
    (keys / "dir.pub").mkdir()
    with pytest.raises(KeyFileError, match=r"dir.pub: is a directory"):
        Keyring.load(keys)
    with pytest.raises(KeyFileError, match=r"is a device"):
        Keyring.load(Path("/dev/null"))


def test_bootloader_files_that_are_links_or_fifos_are_refused(tmp_path: Path, victim: Path) -> None:
    sim_file = tmp_path / "bootloader.json"
    sim_file.symlink_to(victim)
    with pytest.raises(BootEnvError, match=r"sim backend.*is a symbolic link"):
        SimEnv(sim_file, ("A", "B")).load()
    grubenv = tmp_path / "grubenv"
    os.mkfifo(grubenv)
    with pytest.raises(GrubEnvError, match=r"is a FIFO"):
        read_block(grubenv)
    fw_config = tmp_path / "fw_env.config"
    fw_config.symlink_to(victim)
    with pytest.raises(BootEnvError, match=r"cannot read config: is a symbolic link"):
        UBootEnvStore(fw_config).read()
    fw_config.unlink()
    env_copy = tmp_path / "uboot.env"
    os.mkfifo(env_copy)
    fw_config.write_text(f"{env_copy} 0x0 0x2000\n")
    with pytest.raises(BootEnvError, match=r"is a FIFO, not a regular file or block device"):
        UBootEnvStore(fw_config).read()
    esp = tmp_path / "esp"
    (esp / "loader").mkdir(parents=True)
    (esp / "loader" / "loader.conf").symlink_to(victim)
    with pytest.raises(BootEnvError, match=r"loader.conf.*is a symbolic link"):
        BlsEnv(esp, ("A", "B"), efivars=None).load()
    assert victim.read_bytes() == b"slot contents " * 1000
