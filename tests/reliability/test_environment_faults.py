"""Environment faults on a simulated device, with real kernel objects where the
machine has them: disk full (a size-limited tmpfs) during the slot write and
during the state writes; a read-only state directory (a read-only bind mount);
one copy of U-Boot's redundant environment corrupted; an environment write that
fails (the env file bind-mounted read-only); a slot returning EIO (a loop
device over a sparse file on a full tmpfs: the kernel fails the writes, the
error comes back at write or fsync); a clock unset or jumping; a new slot whose
agent crash-loops (boot-check SIGKILLed at every boot); a broker that accepts
and then drops every connection (the daemon keeps serving, with backoff).

After each: the error is one clear line, the booted slot is byte for byte what
it was and boots, the device's status works, and once the fault is gone the
next install succeeds and commits. No retry of a failed fsync: the transaction
ends and the next install rewrites the slot from its first byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import sim
from agent.crashpoint import ENV
from agent.daemon import build_device
from agent.installer import install
from agent.sim import UBOOT_ENV_SIZE
from agent.sources import source_for
from agent.status import status
from bundler.build import BundleSpec, build_full
from hw.bootloader.model import SlotBootState
from ota_common.errors import OtaError
from tests.e2e._mqtt import Daemon, daemons
from tests.powercut.conftest import COMPATIBLE, SLOT_SIZE, Releases
from tests.powercut.explore import REPO
from tests.reliability.results import record

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and loop devices need root")


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False)


def used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def new_device(d: Path, releases: Releases, backend: str = "sim") -> Path:
    sim.init(sim.SimSpec(directory=d, image=releases.factory.path, keyring=releases.keyring, compatible=COMPATIBLE,
                         bootloader=backend, slot_size=SLOT_SIZE, tries=3))
    sim.power_on(d, say=lambda _: None)
    return d


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_fails(d: Path, bundle: Path) -> str:
    with pytest.raises(OtaError) as info, source_for(str(bundle)).open() as stream:
        install(build_device(sim.config_path(d)), stream)
    text = str(info.value)
    assert text
    assert "\n" not in text
    return text


def recovers(d: Path, releases: Releases, booted_sha: str, bundle: Path | None = None, version: str = "3.0") -> None:
    """The booted slot A is intact and boots; status works; the next install commits."""
    assert sha(d / "slot-A.img") == booted_sha
    sim.power_on(d, say=lambda _: None)
    doc = status(build_device(sim.config_path(d)))
    assert doc.booted == "A"
    with source_for(str(bundle or releases.v3.bundle)).open() as stream:
        install(build_device(sim.config_path(d)), stream)
    sim.power_on(d, say=lambda _: None)
    doc = status(build_device(sim.config_path(d)))
    assert (doc.booted, doc.to_json()["slots"]["B"]["version"]) == ("B", version)
    assert doc.to_json()["slots"]["B"]["boot_state"] == SlotBootState.GOOD.value


def done(name: str) -> None:
    record("environment fault", name, passed=True)


@needs_root
def test_disk_full_during_the_slot_write_fails_cleanly_and_the_next_install_works(
    tmp_path: Path, releases: Releases
) -> None:
    with tmpfs(tmp_path / "fs", 64 << 20) as fs:
        d = new_device(fs / "device", releases)
        booted = sha(d / "slot-A.img")
        resize(fs, used(fs) + (256 << 10))  # room for the state, not for the image
        error = install_fails(d, releases.v3.bundle)
        assert "No space left on device" in error or "space" in error
        assert build_device(sim.config_path(d)).bootloader.state().slots["B"].state is SlotBootState.BAD
        resize(fs, 64 << 20)
        recovers(d, releases, booted)
    done("disk full during the slot write")


@needs_root
def test_disk_full_during_the_state_writes_fails_cleanly_and_the_next_install_works(
    tmp_path: Path, releases: Releases
) -> None:
    with tmpfs(tmp_path / "fs", 64 << 20) as fs:
        d = new_device(fs / "device", releases)
        booted = sha(d / "slot-A.img")
        slot_b = sha(d / "slot-B.img")
        resize(fs, used(fs) + (64 << 10))
        filler = fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
        os.close(fd)
        install_fails(d, releases.v3.bundle)
        assert sha(d / "slot-B.img") == slot_b  # refused before any slot byte was written
        filler.unlink()
        resize(fs, 64 << 20)
        recovers(d, releases, booted)
    done("disk full during the state writes")


@needs_root
def test_a_read_only_state_directory_refuses_the_install_and_status_still_works(
    tmp_path: Path, releases: Releases
) -> None:
    d = new_device(tmp_path / "device", releases)
    booted, slot_b = sha(d / "slot-A.img"), sha(d / "slot-B.img")
    with read_only(d / "state"):
        error = install_fails(d, releases.v3.bundle)
        assert "Read-only file system" in error or "read-only" in error.lower()
        assert status(build_device(sim.config_path(d))).booted == "A"
    assert sha(d / "slot-B.img") == slot_b
    recovers(d, releases, booted)
    done("read-only state directory")


@pytest.mark.parametrize("copy", [0, 1])
def test_one_corrupted_copy_of_the_redundant_uboot_env_still_boots_and_updates(
    tmp_path: Path, releases: Releases, copy: int
) -> None:
    d = new_device(tmp_path / "device", releases, "uboot")
    env = d / "uboot.env"
    data = bytearray(env.read_bytes())
    data[copy * UBOOT_ENV_SIZE + 20] ^= 0xFF  # inside the variables: the copy's CRC no longer matches
    env.write_bytes(bytes(data))
    recovers(d, releases, sha(d / "slot-A.img"))
    done(f"redundant env copy {copy} corrupted")


@needs_root
def test_an_env_write_that_fails_is_a_loud_error_before_any_slot_byte(tmp_path: Path, releases: Releases) -> None:
    d = new_device(tmp_path / "device", releases, "uboot")
    booted, slot_b = sha(d / "slot-A.img"), sha(d / "slot-B.img")
    env = d / "uboot.env"
    env_before = env.read_bytes()
    with read_only(env):
        error = install_fails(d, releases.v3.bundle)
        assert "uboot.env" in error or "environment" in error.lower() or "Read-only" in error
    assert env.read_bytes() == env_before
    assert sha(d / "slot-B.img") == slot_b
    recovers(d, releases, booted)
    done("env write fails")


@needs_root
def test_a_slot_returning_eio_ends_the_install_and_the_next_one_rewrites_it(
    tmp_path: Path, releases: Releases
) -> None:
    """Slot B is a loop device over a sparse file on a tmpfs with no room: the
    kernel fails its writes (EIO at write or fsync); there is no fsync retry."""
    d = new_device(tmp_path / "device", releases)
    booted = sha(d / "slot-A.img")
    with tmpfs(tmp_path / "backing", 1 << 20) as fs:
        backing = fs / "slot-B.img"
        with backing.open("wb") as f:
            f.truncate(SLOT_SIZE)
        loop = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                              text=True).stdout.strip()
        try:
            config = sim.config_path(d)
            config.write_text(config.read_text().replace('path = "slot-B.img"', f'path = "{loop}"'))
            error = install_fails(d, releases.v3.bundle)
            assert "Input/output error" in error or "No space" in error, error
            assert build_device(config).bootloader.state().slots["B"].state is SlotBootState.BAD
            resize(fs, 16 << 20)
            recovers(d, releases, booted)
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)
    done("slot EIO on write/fsync (loop device over a full tmpfs)")


def test_an_unset_clock_checks_expiry_against_the_signed_creation_time_and_says_so(
    tmp_path: Path, releases: Releases, caplog: pytest.LogCaptureFixture
) -> None:
    d = new_device(tmp_path / "device", releases)
    created = datetime.now(UTC).replace(microsecond=0)
    bundle = tmp_path / "expiring.otab"
    build_full(BundleSpec(image=releases.v3.path, key=_private(releases), version="3.0", security_version=3,
                          compatible=COMPATIBLE, expires=created + timedelta(days=30), threads=1), bundle)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    with caplog.at_level(logging.WARNING), source_for(str(bundle)).open() as stream:
        install(build_device(sim.config_path(d), clock=lambda: epoch), stream)
    assert "behind the bundle's signed creation time" in caplog.text
    # ten years on, the same bundle is expired: refused, nothing written
    later = created + timedelta(days=3650)
    with pytest.raises(OtaError, match="expired"), source_for(str(bundle)).open() as stream:
        install(build_device(sim.config_path(d), clock=lambda: later), stream)
    done("clock unset / jumped")


def test_a_clock_jumping_back_and_forth_mid_install_fires_no_timeout(tmp_path: Path, releases: Releases) -> None:
    d = new_device(tmp_path / "device", releases)
    times = [datetime(1970, 1, 1, tzinfo=UTC), datetime(2040, 1, 1, tzinfo=UTC)]
    calls = [0]

    def jumping() -> datetime:
        calls[0] += 1
        return times[calls[0] % 2]

    with source_for(str(releases.v3.bundle)).open() as stream:
        install(build_device(sim.config_path(d), clock=jumping), stream)
    sim.power_on(d, say=lambda _: None)
    assert status(build_device(sim.config_path(d))).booted == "B"
    done("clock jumps mid-install")


def test_a_new_slot_whose_agent_crash_loops_falls_back_to_the_old_one(tmp_path: Path, releases: Releases) -> None:
    d = new_device(tmp_path / "device", releases)
    booted = sha(d / "slot-A.img")
    with source_for(str(releases.v2.bundle)).open() as stream:
        install(build_device(sim.config_path(d)), stream)
    env = {**os.environ, ENV: "during-health-check", "PYTHONPATH": str(REPO)}
    crashes = 0
    for _ in range(6):  # every boot of B: the agent dies in boot-check (its restart limit is this loop)
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "sim", "boot", str(d)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != -9:
            break
        crashes += 1
    assert crashes == 3  # the boot counter's 3 tries, then the firmware falls back to A
    doc = status(build_device(sim.config_path(d))).to_json()
    assert doc["booted"] == "A"
    assert doc["slots"]["B"]["boot_state"] != SlotBootState.GOOD.value
    assert doc["last_result"]["event"] == "rollback"
    recovers(d, releases, booted)
    done("new slot's agent crash-loops")


def _private(releases: Releases) -> Path:
    """The powercut releases' private key sits beside its public key (bundler.format.signing.generate_key)."""
    return releases.keyring.with_name("signing.key")


class DroppingBroker:
    """A TCP server that accepts every connection, reads what the client sends
    (its MQTT CONNECT) and closes it without an answer."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.recv(4096)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def test_a_broker_that_drops_every_connection_leaves_the_agent_serving_with_backoff(
    tmp_path: Path, releases: Releases
) -> None:
    broker = DroppingBroker()
    d = tmp_path / "device"
    try:
        sim.init(sim.SimSpec(directory=d, image=releases.factory.path, keyring=releases.keyring,
                             compatible=COMPATIBLE, slot_size=SLOT_SIZE, mqtt=f"mqtt://127.0.0.1:{broker.port}",
                             device_id="dropped-1"))
        sim.power_on(d, say=lambda _: None)
        daemon = Daemon(d).start()
        with daemons(daemon):
            deadline = time.monotonic() + 8
            while broker.accepted < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)
            assert daemon.running, daemon.log_text()[-2000:]
            assert broker.accepted >= 2, "the agent did not reconnect"
            assert broker.accepted <= 30, f"{broker.accepted} connections: no backoff"
            cli = subprocess.run([sys.executable, "-m", "agent.cli", "-c", str(sim.config_path(d)), "install",
                                  str(releases.v3.bundle)], cwd=REPO, capture_output=True, text=True, timeout=120,
                                 check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert cli.returncode == 0, cli.stderr
            assert daemon.running
        assert daemon.proc is not None
        assert daemon.proc.returncode == 0, daemon.log_text()[-2000:]
    finally:
        broker.close()
    sim.power_on(d, say=lambda _: None)
    assert status(build_device(sim.config_path(d))).booted == "B"
    done("broker accepts then drops every connection")
