"""Fuzz the serial console's line discipline (agent.console.wire.Splitter) and the
frame and control-line parsers (ota_common.frames): the input's first byte picks
the read size the bytes arrive in; whatever they are, nothing raises, the buffer
stays bounded, lines are printable text within the line limit, and every frame
recognised carries a payload within the format's bounds."""

from __future__ import annotations

from agent.console.wire import MAX_LINE, Line, Splitter
from ota_common.frames import MAX_PAYLOAD, OVERHEAD, Frame, parse_control
from tests.fuzz._harness import main


def one_input(data: bytes) -> None:
    step = 1 + (data[0] if data else 0)
    splitter = Splitter()
    for i in range(1, len(data), step):
        for item in splitter.feed(data[i : i + step]):
            if isinstance(item, Line):
                assert len(item.text.encode()) <= MAX_LINE
                assert all(ch.isprintable() or ch == "\t" for ch in item.text)
                parse_control(item.text)
            elif isinstance(item, Frame):
                assert 1 <= len(item.payload) <= MAX_PAYLOAD
        assert splitter.buffered <= MAX_LINE + MAX_PAYLOAD + OVERHEAD
    splitter.expire()


if __name__ == "__main__":
    main(one_input)
