"""sd_notify against a datagram socket the test creates, as systemd would: a
filesystem path and an abstract ``@name``; SO_PASSCRED shows the sender pid
(systemd's NotifyAccess=main check). The real `systemd-notify` writes to the
same receiver as a reference for the wire format."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw.errors import WatchdogError
from hw.sdnotify import SdNotify, notify_address


class Receiver:
    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self) -> tuple[str, int]:
        """(message, sender pid); closes any fds passed along (systemd-notify's barrier)."""
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("=iII", payload[:12])[0]
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"={len(payload) // 4}i", payload):
                    os.close(fd)
        return data.decode(), pid


def _receiver(address: str, env_value: str) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(5)
        yield Receiver(sock, env_value)
    finally:
        sock.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = str(tmp_path / "notify.sock")
    yield from _receiver(path, path)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"edge-ota-test-{os.getpid()}"
    yield from _receiver("\0" + name, "@" + name)


def test_ready_status_and_watchdog_arrive_as_single_datagrams(receiver: Receiver) -> None:
    n = SdNotify({"NOTIFY_SOCKET": receiver.env_value})
    assert n.enabled
    assert n.ready("waiting for bundles")
    assert receiver.recv() == ("READY=1\nSTATUS=waiting for bundles", os.getpid())
    assert n.watchdog()
    assert receiver.recv()[0] == "WATCHDOG=1"
    assert n.status("installing 42%\ninto slot B")
    assert receiver.recv()[0] == "STATUS=installing 42% into slot B"
    assert n.extend_timeout(90)
    assert receiver.recv()[0] == "EXTEND_TIMEOUT_USEC=90000000"
    assert n.watchdog_trigger()
    assert receiver.recv()[0] == "WATCHDOG=trigger"
    assert n.stopping()
    assert receiver.recv()[0] == "STOPPING=1"


def test_abstract_namespace_socket(abstract_receiver: Receiver) -> None:
    assert notify_address(abstract_receiver.env_value).startswith("\0")
    SdNotify({"NOTIFY_SOCKET": abstract_receiver.env_value}).watchdog()
    assert abstract_receiver.recv() == ("WATCHDOG=1", os.getpid())


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    n = SdNotify({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert SdNotify(env).watchdog_interval() == 15.0
    assert SdNotify({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 15.0
    assert SdNotify({**env, "WATCHDOG_PID": "1"}, pid=4242).watchdog_interval() is None
    assert SdNotify({**env, "WATCHDOG_USEC": "0"}).watchdog_usec() is None
    with pytest.raises(WatchdogError, match="WATCHDOG_USEC='soon' is not a number"):
        SdNotify({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval()


def test_a_vanished_socket_is_a_loud_error(tmp_path: Path) -> None:
    with pytest.raises(WatchdogError, match=r"cannot send to NOTIFY_SOCKET=.*gone\.sock"):
        SdNotify({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).watchdog()


@pytest.mark.parametrize("value", ["relative.sock", "vsock:2:1234"])
def test_unsupported_socket_addresses_are_refused(value: str) -> None:
    with pytest.raises(WatchdogError, match="unsupported NOTIFY_SOCKET"):
        SdNotify({"NOTIFY_SOCKET": value}).ready()


def test_malformed_assignments_are_refused(receiver: Receiver) -> None:
    n = SdNotify({"NOTIFY_SOCKET": receiver.env_value})
    for bad in ("READY", "=1", "A=1\nB=2"):
        with pytest.raises(WatchdogError, match="not one KEY=VALUE line"):
            n.send(bad)
    with pytest.raises(WatchdogError, match="exceeds 4096"):
        n.send("X=" + "y" * 5000)


AGENT = """
import time
from hw.sdnotify import SdNotify
n = SdNotify()
interval = n.watchdog_interval()
n.ready(f"interval {interval}")
for _ in range(3):
    time.sleep(interval)
    n.watchdog()
"""


def test_a_service_process_pings_at_half_its_watchdog_interval(receiver: Receiver) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=receiver.env_value, WATCHDOG_USEC="200000")
    proc = subprocess.Popen([sys.executable, "-c", AGENT], env=env)
    try:
        msg, pid = receiver.recv()
        assert (msg, pid) == ("READY=1\nSTATUS=interval 0.1", proc.pid)
        assert [receiver.recv() for _ in range(3)] == [("WATCHDOG=1", proc.pid)] * 3
    finally:
        assert proc.wait(timeout=10) == 0


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="systemd-notify absent")
def test_same_wire_format_as_systemd_notify(receiver: Receiver) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=receiver.env_value)
    subprocess.run(["systemd-notify", "--no-block", "--ready", "--status=up and running"], env=env, check=True)
    reference = receiver.recv()[0]
    SdNotify({"NOTIFY_SOCKET": receiver.env_value}).ready("up and running")
    ours = receiver.recv()[0]
    assert sorted(ours.split("\n")) == sorted(reference.split("\n"))
