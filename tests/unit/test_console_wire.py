"""The console's frame format (ota_common.frames) and line discipline
(agent.console.wire) on bytes alone: frames round-trip; a flipped bit anywhere in
a frame is caught (header CRC or CRC-32); frames are found amid noise and split
reads; whatever arrives, the buffer stays bounded and nothing raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.console.wire import MAX_LINE, BadFrame, Line, Noise, Splitter, TooLong
from ota_common.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    OVERHEAD,
    Frame,
    FrameError,
    ack_line,
    decode_frame,
    decode_header,
    efficiency,
    encode,
    nak_line,
    parse_control,
)


def test_a_frame_round_trips() -> None:
    raw = encode(7, 8192, b"payload" * 100)
    header = decode_header(raw)
    assert (header.transfer, header.offset, header.length) == (7, 8192, 700)
    assert decode_frame(header, raw) == Frame(7, 8192, b"payload" * 100)
    assert len(raw) == 700 + OVERHEAD


def test_every_single_bit_flip_is_caught() -> None:
    raw = encode(1, 0, bytes(range(64)))
    for i in range(len(raw) * 8):
        bad = bytearray(raw)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(FrameError):
            decode_frame(decode_header(bad), bad)


def test_payload_bounds_are_enforced_both_ways() -> None:
    with pytest.raises(FrameError):
        encode(1, 0, b"")
    with pytest.raises(FrameError):
        encode(1, 0, bytes(MAX_PAYLOAD + 1))
    assert efficiency(4096) == pytest.approx(4096 / 4122)


def test_control_lines_round_trip_and_junk_is_none() -> None:
    ack = parse_control(ack_line(5, 4096, 36864))
    assert ack is not None
    assert (ack.kind, ack.transfer, ack.next, ack.limit) == ("ack", 5, 4096, 36864)
    nak = parse_control(nak_line(5, 0, "CRC-32 mismatch"))
    assert nak is not None
    assert (nak.kind, nak.next, nak.reason) == ("nak", 0, "CRC-32 mismatch")
    for junk in ("@ack", "@ack x y z", "@nope 1 2 3", "ack 1 2 3", ""):
        assert parse_control(junk) is None


def test_lines_end_at_cr_or_lf_and_split_reads_join() -> None:
    s = Splitter()
    assert s.feed(b"sta") == []
    assert s.feed(b"tus\r\nslots\n\n") == [Line("status"), Line("slots")]


def test_frames_are_found_amid_lines_and_noise() -> None:
    frame = encode(3, 0, b"\n\r" * 50)  # line ends inside the payload are payload
    s = Splitter()
    items = s.feed(b"help\r" + b"half a line" + frame + b"progress\r")
    assert items == [Line("help"), Noise(11), Frame(3, 0, b"\n\r" * 50), Line("progress")]


def test_a_damaged_frame_is_reported_with_its_offset_and_the_next_one_is_read() -> None:
    bad = bytearray(encode(3, 4096, b"x" * 100))
    bad[HEADER_SIZE + 5] ^= 0xFF
    good = encode(3, 8192, b"y" * 100)
    items = Splitter().feed(bytes(bad) + good)
    assert isinstance(items[0], BadFrame)
    assert items[0].offset == 4096
    assert items[1] == Frame(3, 8192, b"y" * 100)


def test_a_corrupted_length_does_not_make_the_reader_wait() -> None:
    bad = bytearray(encode(3, 0, b"x" * 100))
    bad[6] ^= 0x40  # the length field (now 16484): the header CRC fails, scanning goes on
    items = Splitter().feed(bytes(bad) + b"\rstatus\r")
    assert items == [Noise(len(bad) - 1), Line("status")]  # its bytes up to the line end are noise


def test_an_unfinished_frame_expires_and_the_next_line_is_read() -> None:
    s = Splitter()
    s.feed(encode(3, 0, b"x" * 1000)[:500])
    assert s.expire() == Noise(500)
    assert s.feed(b"json on\r") == [Line("json on")]


def test_a_long_line_is_dropped_once_and_memory_stays_bounded() -> None:
    s = Splitter()
    items: list[object] = []
    for _ in range(256):
        items += s.feed(b"x" * 4096)
        assert s.buffered <= MAX_LINE
    items += s.feed(b"\rstatus\r")
    assert items == [TooLong(MAX_LINE), Line("status")]


def test_control_characters_and_bad_utf8_are_noise() -> None:
    assert Splitter().feed(b"stat\x00us\r\xff\xfe\r\x1b[2Jclear\r") == [Noise(7), Noise(2), Noise(9)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=30))
def test_any_bytes_keep_the_splitter_bounded_and_items_well_formed(chunks: list[bytes]) -> None:
    s = Splitter()
    for chunk in chunks:
        for item in s.feed(chunk):
            if isinstance(item, Line):
                assert item.text.isprintable() or "\t" in item.text
                assert len(item.text.encode()) <= MAX_LINE
        assert s.buffered <= MAX_LINE + MAX_PAYLOAD + OVERHEAD


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), st.binary(min_size=1, max_size=2000), st.integers(1, 50))
def test_a_frame_after_any_noise_is_recovered_whatever_the_read_sizes(noise: bytes, payload: bytes,
                                                                       step: int) -> None:
    data = noise + b"\r" + encode(9, 0, payload)
    s = Splitter()
    items = []
    for i in range(0, len(data), step):
        items += s.feed(data[i : i + step])
    assert Frame(9, 0, payload) in items
