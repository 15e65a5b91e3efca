"""Reassembly of a bundle streamed over MQTT in chunks (agent.mqtt.stream): order,
duplicates, gaps, the window, the size, the hash, the stall limit, the credit."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable

import pytest

from agent.config import DownloadConfig
from agent.errors import SourceError
from agent.mqtt.schema import chunk_message, parse_credit
from agent.mqtt.stream import MqttStreamSource, Reassembly, window_chunks

CHUNK = 1024
DATA = bytes(range(256)) * 37  # 9472 bytes: 9 full chunks and one of 256
DIGEST = hashlib.sha256(DATA).hexdigest()


def chunk(i: int, data: bytes = DATA) -> bytes:
    return chunk_message(i * CHUNK, data[i * CHUNK : (i + 1) * CHUNK])


def assembly(window: int = 4, data: bytes = DATA, digest: str = DIGEST) -> Reassembly:
    r = Reassembly("test", len(data), digest, CHUNK, window)
    assert r.credit() == {"credit": min(window, -(-len(data) // CHUNK)), "next": 0}  # never past the size
    return r


def drain(r: Reassembly) -> bytes:
    return r.take(r.available)


def test_in_order_chunks_come_out_as_the_bundle() -> None:
    r = assembly(window=len(DATA) // CHUNK + 1)
    for i in range(10):
        assert r.accept(chunk(i))
    assert r.complete
    assert drain(r) == DATA


def test_a_redelivered_chunk_is_ignored() -> None:
    r = assembly()
    assert r.accept(chunk(0))
    assert not r.accept(chunk(0))
    assert r.accept(chunk(2))
    assert not r.accept(chunk(2))  # waiting in the window: a duplicate too
    assert r.duplicates == 2
    assert drain(r) == DATA[:CHUNK]


def test_a_gap_waits_until_it_is_filled() -> None:
    r = assembly()
    r.accept(chunk(1))
    r.accept(chunk(2))
    assert r.available == 0
    r.accept(chunk(0))
    assert drain(r) == DATA[: 3 * CHUNK]


def test_a_chunk_beyond_the_granted_window_is_refused() -> None:
    r = assembly(window=4)
    with pytest.raises(SourceError, match=r"offset 4096 is beyond the granted window .below 4096.; the sender ignores"):
        r.accept(chunk(4))
    assert r.held == 0


def test_memory_held_never_exceeds_the_window_whatever_the_order() -> None:
    r = assembly(window=4)
    got = bytearray()
    order = [3, 1, 2, 0]
    while not r.complete or r.available:
        for i in order:
            if i * CHUNK < r.granted:
                r.accept(chunk(i))
        got += r.take(700)
        r.credit()
        base = r.expected // CHUNK
        order = [base + 3, base + 1, base + 2, base]
        order = [i for i in order if i * CHUNK < len(DATA)]
        assert r.held <= 4 * CHUNK
    assert bytes(got) == DATA
    assert r.peak <= 4 * CHUNK


@pytest.mark.parametrize(("payload", "message"), [
    (b"\0\0\0", "a chunk message of 3 bytes has no 8-byte offset header"),
    (chunk_message(100, b"x" * CHUNK), "chunk offset 100 is not a multiple of the chunk size 1024"),
    (chunk_message(10 * CHUNK, b"x" * 10), "chunk offset 10240 is at or past the bundle's size of 9472 bytes"),
    (chunk_message(0, b"x" * (CHUNK + 1)), "the chunk at offset 0 has 1025 bytes, not 1024"),
    (chunk_message(0, b"x" * 10), "the chunk at offset 0 has 10 bytes, not 1024"),
])
def test_a_malformed_chunk_ends_the_transfer_with_a_specific_error(payload: bytes, message: str) -> None:
    r = assembly(window=16)
    with pytest.raises(SourceError, match=message) as caught:
        r.accept(payload)
    assert not caught.value.transient


def test_a_last_chunk_longer_than_the_size_is_an_overrun() -> None:
    r = assembly(window=16)
    with pytest.raises(SourceError, match="offset 9216 has 1024 bytes, not 256"):
        r.accept(chunk_message(9 * CHUNK, b"y" * CHUNK))


def test_a_hash_mismatch_withholds_the_last_bytes() -> None:
    r = assembly(window=16, digest="0" * 64)
    for i in range(9):
        r.accept(chunk(i))
    with pytest.raises(SourceError, match=r"SHA-256 .* not the job's 0000") as caught:
        r.accept(chunk(9))
    assert not caught.value.transient
    assert r.available == 0


def test_credit_is_granted_again_as_the_reader_consumes() -> None:
    r = assembly(window=4)
    for i in range(4):
        r.accept(chunk(i))
    assert r.credit() is None  # nothing read: the window has not moved
    r.take(CHUNK)
    assert r.credit() is None  # a quarter of the window: not yet
    r.take(CHUNK)
    assert r.credit() == {"credit": 2, "next": 4 * CHUNK}
    assert r.granted == 6 * CHUNK
    assert r.credit(force=True) == {"credit": 2, "next": 4 * CHUNK}


def test_the_window_is_at_most_two_mebibytes() -> None:
    assert window_chunks(1024) == 8
    assert window_chunks(256 * 1024) == 8
    assert window_chunks(512 * 1024) == 4


def test_parse_credit_refuses_what_is_not_a_credit() -> None:
    assert parse_credit(b'{"credit":2,"next":0}') == {"credit": 2, "next": 0}
    assert parse_credit(b'{"credit":-1,"next":0}') is None
    assert parse_credit(b'{"credit":true,"next":0}') is None
    assert parse_credit(b"[]") is None
    assert parse_credit(b"\xff") is None


class MemoryLink:
    """An in-process broker of one subscriber: what the stream publishes is recorded."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[str, bytes], object]] = {}
        self.published: list[dict[str, object]] = []
        self.cond = threading.Condition()

    def add_route(self, topic: str, handler: Callable[[str, bytes], object], timeout: float) -> bool:
        self.routes[topic] = handler
        return True

    def remove_route(self, topic: str) -> None:
        self.routes.pop(topic, None)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        with self.cond:
            self.published.append(json.loads(payload))
            self.cond.notify_all()
        return 1


def source(link: MemoryLink, **limits: float) -> MqttStreamSource:
    return MqttStreamSource(link, "c", "k", size=len(DATA), sha256=DIGEST, chunk_size=CHUNK,
                            limits=DownloadConfig(**limits), resend_after=0.05)  # type: ignore[arg-type]


def test_the_stream_reads_the_bundle_sent_as_credit_allows() -> None:
    link = MemoryLink()
    src = source(link)
    stop = threading.Event()

    def operator() -> None:
        sent = 0
        while sent * CHUNK < len(DATA) and not stop.is_set():
            with link.cond:
                doc = link.published[-1] if link.published else None
                limit = int(doc["next"]) + int(doc["credit"]) * CHUNK if doc else 0  # type: ignore[call-overload]
                if sent * CHUNK >= limit:
                    link.cond.wait(0.1)
                    continue
            link.routes["c"]("c", chunk(sent))
            link.routes["c"]("c", chunk(sent))  # every chunk redelivered once
            sent += 1

    with src.open() as stream:
        sender = threading.Thread(target=operator)
        sender.start()
        got = bytearray()
        while data := stream.read(333):
            got += data
        stop.set()
        sender.join()
    assert bytes(got) == DATA
    assert src.stream is not None
    assert src.stream.state.peak <= window_chunks(CHUNK) * CHUNK
    assert link.published[-1] == {"closed": True, "credit": 0, "next": len(DATA)}
    assert "c" not in link.routes


def test_no_chunk_for_the_stall_time_is_a_transient_error_and_credit_is_sent_again() -> None:
    link = MemoryLink()
    stalled = r"stalled: fewer than 1024 bytes in 0\.3 s after 0 bytes"
    with source(link, stall_seconds=0.3).open() as stream, pytest.raises(SourceError, match=stalled) as caught:
        stream.read(100)
    assert caught.value.transient
    assert any(doc.get("resend") for doc in link.published)


def test_an_error_on_the_network_thread_reaches_the_reader() -> None:
    link = MemoryLink()
    with source(link).open() as stream:
        link.routes["c"]("c", chunk_message(64 * CHUNK, b""))
        with pytest.raises(SourceError, match="at or past the bundle's size"):
            stream.read(100)
