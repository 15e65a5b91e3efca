"""Anything on the wire, over a pty pair: random bytes, a 1 MiB line, NUL bytes (a
UART's break), a break condition sent on the line, a technician who stops reading
(flow control held) while the device talks, and a session that goes silent. Each
gives an error line, a clean wait or a reset, never a crash or a hang: the
console answers the next command every time, and nothing on the device changed."""

from __future__ import annotations

import random
import termios
import time
from collections.abc import Iterator

import pytest

from tests.e2e._console import Pty, Technician, add_console, served
from tests.e2e._sim import SimDevice


@pytest.fixture
def tech(device: SimDevice) -> Iterator[Technician]:
    pty = Pty.open()
    add_console(device.config, pty.path, idle_timeout=1.0)
    try:
        with served(device.config) as (_, front):
            tech = Technician(pty.master)
            tech.front = front  # type: ignore[attr-defined]
            tech.wait_ready()
            yield tech
    finally:
        pty.close()


def _still_answers(tech: Technician) -> None:
    tech.quiet(0.2)
    tech.line("")
    tech.line("progress")
    assert tech.expect("^no job is running$")


def test_random_bytes_are_noise_and_the_console_answers_after(device: SimDevice, tech: Technician) -> None:
    before = device.snapshot()
    rng = random.Random(7)
    for _ in range(20):
        tech.send(rng.randbytes(rng.randrange(1, 8192)))
    tech.send(b"\r")
    seen = tech.quiet(1.5)
    assert any("binary noise" in line or "unknown command" in line or "line too long" in line for line in seen)
    assert all(line.isprintable() for line in seen)  # nothing of the noise echoed raw
    _still_answers(tech)
    assert device.snapshot().slot("B") == before.slot("B")


def test_a_one_mebibyte_line_is_dropped_with_one_error(tech: Technician) -> None:
    tech.send(b"x" * (1 << 20) + b"\r")
    assert tech.expect(r"^error: line too long \(more than 4096 bytes\); discarded")
    rest = tech.quiet(0.5)
    assert not any("unknown command" in line for line in rest)  # no piece of it ran as a command
    _still_answers(tech)


def test_nul_bytes_and_a_break_are_noise(tech: Technician) -> None:
    tech.send(b"stat\x00us\r")  # a break in the middle of a word, as a UART delivers it
    assert tech.expect("binary noise")
    tech.send(b"\x00" * 1000)
    termios.tcsendbreak(tech.fd, 0)  # a break condition on the line itself
    time.sleep(1.1)  # past the noise notice's once-a-second limit
    _still_answers(tech)


def test_a_technician_who_stops_reading_does_not_hang_the_console(tech: Technician) -> None:
    # ~2000 replies nobody reads: more than the pty holds, so the device's writes time out
    # and that output is dropped; it must keep reading and answering.
    for _ in range(40):
        tech.send(b"help\r" * 50)
    time.sleep(4.0)
    tech.quiet(1.0)
    assert tech.front.dropped_output > 0  # type: ignore[attr-defined]
    _still_answers(tech)


def test_a_silent_session_times_out_and_is_reset(tech: Technician) -> None:
    tech.line("json on")
    assert tech.reply("json")["result"] == {"json": True}
    line = tech.expect("session timed out", timeout=5)
    assert '"notice"' in line
    tech.line("progress")
    assert tech.expect("^no job is running$")  # back in text mode
