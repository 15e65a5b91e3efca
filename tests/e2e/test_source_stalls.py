"""A source that stops delivering fails the install instead of holding it (and the
state lock) for ever: an HTTP server that trickles, trickles only framing, never
answers or never ends its trailers, a stdin pipe or a FIFO nobody writes to, and
a transfer past its overall deadline. Each is one transient "stalled" (or
"deadline") line naming how far it got; nothing bootable changes.

The device gets small `[download]` limits (a 1 s window), so each case ends in
about a second; the assertions are about what happened, not how long it took."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bundler.format.header import HEADER_SIZE, Header
from tests.e2e._hostile import (
    STATE_LIMIT,
    HostileServer,
    Peer,
    Script,
    assert_refused,
    open_head,
    response,
    servers,
    set_download,
)
from tests.e2e._sim import ERROR_PREFIX, SimDevice
from tests.e2e.conftest import BundleFactory

# One attempt: a stall is transient and an HTTP source would retry it (test_http_resume.py).
WINDOW = {"stall_bytes": 64, "stall_seconds": 1, "retries": 0}
STALLED = "stalled: fewer than 64 bytes in 1 s after"


@pytest.fixture
def hostile() -> Iterator[Callable[[Script], HostileServer]]:
    yield from servers()


@pytest.fixture
def bundle_bytes(make_bundle: BundleFactory) -> bytes:
    return Path(make_bundle("2.0")).read_bytes()


def test_a_server_that_accepts_and_never_answers_stalls(
    device: SimDevice, hostile: Callable[[Script], HostileServer]
) -> None:
    set_download(device, **WINDOW)
    server = hostile(Peer.hold)
    before = device.snapshot()
    assert_refused(device, before, server.url(), f"{STALLED} 0 bytes (waiting for the response)")


def test_a_body_trickling_one_byte_per_second_stalls(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    set_download(device, **WINDOW)

    def script(peer: Peer) -> None:
        if peer.send(response(f"HTTP/1.1 200 OK\nContent-Length: {len(bundle_bytes)}", bundle_bytes[:10])):
            peer.trickle(bundle_bytes[10:HEADER_SIZE], every=1.0)

    server = hostile(script)
    before = device.snapshot()
    assert_refused(device, before, server.url(), f"{STALLED} 1")


def test_headers_trickling_stall_while_waiting_for_the_response(
    device: SimDevice, hostile: Callable[[Script], HostileServer]
) -> None:
    set_download(device, **WINDOW)
    server = hostile(lambda peer: peer.trickle(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: 1\r\n" * 10, every=0.5, step=4))
    before = device.snapshot()
    assert_refused(device, before, server.url(), f"{STALLED} 0 bytes (waiting for the response)")


def test_chunk_framing_that_keeps_coming_does_not_count_as_progress(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    """Kilobytes of chunk extensions a second around one bundle byte each: the
    connection is busy, the bundle does not advance."""
    set_download(device, **WINDOW)

    def script(peer: Peer) -> None:
        if not peer.send(open_head("HTTP/1.1 200 OK\nTransfer-Encoding: chunked") + b"\r\n"):
            return
        for byte in bundle_bytes[:HEADER_SIZE]:
            if not peer.send(b"1;pad=" + b"p" * 900 + b"\r\n" + bytes([byte]) + b"\r\n") or peer.stop.wait(0.1):
                return

    server = hostile(script)
    before = device.snapshot()
    assert_refused(device, before, server.url(), STALLED)


def test_trailers_trickling_without_end_stall(device: SimDevice, hostile: Callable[[Script], HostileServer]) -> None:
    set_download(device, **WINDOW)

    def script(peer: Peer) -> None:
        if peer.send(response("HTTP/1.1 200 OK\nTransfer-Encoding: chunked", b"0\r\n")):
            peer.trickle_forever(b"X-T: 1\r\n", every=0.3)

    server = hostile(script)
    before = device.snapshot()
    assert_refused(device, before, server.url(), f"{STALLED} 0 bytes (reading trailers)")


def test_a_steady_transfer_past_its_deadline_fails(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    """Fast enough for the stall window, too slow for the deadline."""
    header = Header.unpack(bundle_bytes[:HEADER_SIZE])
    rate = 200  # bytes per second
    assert header.payload_offset > 3 * rate  # the deadline falls while the bundle's head is read
    set_download(device, stall_bytes=16, stall_seconds=1, deadline=1)  # a deadline is never retried

    def script(peer: Peer) -> None:
        if peer.send(response(f"HTTP/1.1 200 OK\nContent-Length: {len(bundle_bytes)}")):
            peer.trickle(bundle_bytes, every=0.1, step=rate // 10)

    server = hostile(script)
    before = device.snapshot()
    assert_refused(device, before, server.url(), "deadline of 1 s passed after")


def test_a_fifo_nobody_writes_to_stalls(device: SimDevice, tmp_path: Path) -> None:
    set_download(device, **WINDOW)
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    before = device.snapshot()
    assert_refused(device, before, str(fifo), f"{STALLED} 0 bytes")


def test_a_stdin_pipe_that_never_delivers_stalls(device: SimDevice) -> None:
    """The real `ota-agent install -` in a subprocess, its stdin a pipe kept open
    and never written."""
    set_download(device, **WINDOW)
    before = device.snapshot()
    agent = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]
    read_end, write_end = os.pipe()
    err_path = device.dir.parent / "stdin-install.err"
    try:
        with (
            err_path.open("w") as err_file,
            subprocess.Popen(
                [*agent, "-c", str(device.config), "install", "-"], stdin=read_end, stdout=err_file, stderr=err_file
            ) as proc,
        ):
            os.close(read_end)
            try:
                proc.wait(timeout=60)  # a safety net only: a hang fails here instead of hanging the suite
            finally:
                proc.kill()
    finally:
        os.close(write_end)  # held open (and never written) until the agent is gone
    err = err_path.read_text()
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert lines == [f"{ERROR_PREFIX} stdin: {STALLED} 0 bytes"], err
    after = device.snapshot()
    unchanged = (before.slot("A"), before.slot("B"), before.bootloader)
    assert (after.slot("A"), after.slot("B"), after.bootloader) == unchanged
    last = device.status()["last_result"]
    assert (last["result"], last["reason"]) == ("failed", f"stdin: {STALLED} 0 bytes")
    assert (device.dir / "state" / "state.json").stat().st_size < STATE_LIMIT
    assert json.loads((device.dir / "state" / "state.json").read_text())["trial"] is None
