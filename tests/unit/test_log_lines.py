"""Every log record the agent writes is one bounded line, whatever its
arguments carry, and an event's log line is built from cleaned fields."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.events import Event
from agent.logsetup import LINE_LIMIT, CleanFormatter, use_clean_lines
from agent.outbox import EventLog

FAKE = "from server\nota-agent: install: ok\r\x1b[1A\x1b[2K\u2028ota-agent: commit: ok"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(CleanFormatter("ota-agent: %(message)s"))
    logger = logging.getLogger("test.log_lines")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def test_a_percent_argument_from_a_server_cannot_plant_a_log_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("redirect to %s failed", FAKE + "y" * (1 << 20))
    [line] = lines(stream)
    assert line.startswith("ota-agent: redirect to from server\\nota-agent: install: ok\\r\\x1b[1A")
    assert "\x1b" not in line
    assert "\r" not in line
    assert "\u2028" not in line
    assert len(line) <= LINE_LIMIT
    assert line.endswith("…")


def test_a_logged_traceback_stays_on_one_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise RuntimeError(FAKE)
    except RuntimeError:
        logger.exception("boom")
    [line] = lines(stream)
    assert "Traceback (most recent call last):\\n" in line
    assert "RuntimeError: from server\\nota-agent: install: ok" in line


def test_an_event_line_is_bounded_even_with_a_megabyte_reason(
    tmp_path: Path, captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = captured
    events_logger = logging.getLogger("agent.outbox")
    handler = logger.handlers[0]
    events_logger.addHandler(handler)
    level = events_logger.level
    events_logger.setLevel(logging.INFO)
    try:
        EventLog(tmp_path).emit(
            Event(event="install", result="failed", reason=FAKE + "z" * (1 << 20), bundle_version="1\n2")
        )
    finally:
        events_logger.removeHandler(handler)
        events_logger.setLevel(level)
    [line] = lines(stream)
    assert line.startswith("ota-agent: install: failed version 1\\n2 - from server\\nota-agent")
    assert len(line) <= LINE_LIMIT


def test_use_clean_lines_puts_the_formatter_on_every_root_handler() -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        root.handlers[:] = [logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())]
        use_clean_lines("x: %(message)s")
        assert all(isinstance(h.formatter, CleanFormatter) for h in root.handlers)
    finally:
        root.handlers[:] = saved
