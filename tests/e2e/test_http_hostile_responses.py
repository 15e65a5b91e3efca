"""Installing from a hostile HTTP server: every way a response can lie about its
framing or grow without end (chunk sizes, header and trailer floods, folded
lines, Content-Length lies, endless bodies, redirect tricks) is refused with its
own one-line error and exit status 1, changes no slot and no bootloader state,
keeps `status` working and leaves `state.json` small.

The server is scripted over raw sockets (tests/e2e/_hostile.py), so it can send
what no real server library would."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bundler.format.header import HEADER_SIZE
from tests.e2e._hostile import (
    HostileServer,
    Peer,
    Script,
    assert_refused,
    open_head,
    response,
    servers,
    set_download,
)
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory

MiB = 1 << 20
CHUNKED = "HTTP/1.1 200 OK\nTransfer-Encoding: chunked"
FOUND = "HTTP/1.1 302 Found"

Case = Callable[[Peer, bytes], None]


@pytest.fixture
def hostile() -> Iterator[Callable[[Script], HostileServer]]:
    yield from servers()


@pytest.fixture
def bundle_bytes(make_bundle: BundleFactory) -> bytes:
    return Path(make_bundle("2.0")).read_bytes()


def _then_endless(head: str, first: bytes, piece: bytes, budget: int = 256 * MiB) -> Case:
    def script(peer: Peer, bundle: bytes) -> None:
        if peer.send(response(head, first)):
            peer.send_forever(piece, budget)

    return script


def _then_endless_raw(first: bytes, piece: bytes) -> Case:
    def script(peer: Peer, bundle: bytes) -> None:
        if peer.send(first):
            peer.send_forever(piece)

    return script


def _endless_head(head: str, piece: bytes, budget: int = 256 * MiB) -> Case:
    """`head`'s lines, then `piece` for ever, the head never ended."""

    def script(peer: Peer, bundle: bytes) -> None:
        if peer.send(open_head(head)):
            peer.send_forever(piece, budget)

    return script


def _send(head: str, body: bytes = b"") -> Case:
    def script(peer: Peer, bundle: bytes) -> None:
        peer.send(response(head, body))

    return script


def _send_raw(peer: Peer, data: bytes) -> None:
    peer.send(data)


def _folded_location(peer: Peer, bundle: bytes) -> None:
    folds = "".join(f"\n {'x' * 1000}/{i}" for i in range(60))
    peer.send(response(f"{FOUND}\nLocation: /elsewhere{folds}\nContent-Length: 0"))


def _length_longer_than_body(peer: Peer, bundle: bytes) -> None:
    peer.send(response(f"HTTP/1.1 200 OK\nContent-Length: {len(bundle)}", bundle[: HEADER_SIZE + 10]))


def _length_shorter_than_body(peer: Peer, bundle: bytes) -> None:
    peer.send(response("HTTP/1.1 200 OK\nContent-Length: 32", bundle))


def _chunk_without_crlf(peer: Peer, bundle: bytes) -> None:
    peer.send(response(CHUNKED, b"20\r\n" + bundle[:32] + bundle[32:64] + b"\r\n0\r\n\r\n"))


CASES: dict[str, tuple[Case, str]] = {
    # chunk framing
    "chunk size -1": (_then_endless(CHUNKED, b"-1\r\n", b"A"), "invalid chunk size '-1'"),
    "chunk size with a sign": (_send(CHUNKED, b"+40\r\n" + b"A" * 64), "invalid chunk size '+40'"),
    "chunk size of 17 digits": (_send(CHUNKED, b"00000000000000040\r\n"), "invalid chunk size"),
    "chunk-size line without end": (_then_endless(CHUNKED, b"4", b"0"), "chunk-size line longer than 1024 bytes"),
    "chunk extension without end": (_then_endless(CHUNKED, b"40;ext=", b"x"), "chunk-size line longer than 1024"),
    "chunk larger than the cap": (_send(CHUNKED, b"FFFFFFFFFFFFFFFF\r\n"), "would pass the cap of"),
    "chunk not followed by CRLF": (_chunk_without_crlf, "chunk 1 is not followed by CRLF"),
    # headers
    "endless headers": (_endless_head("HTTP/1.1 200 OK", b"X-Filler: 1\r\n"), "more than 100 header fields"),
    "one header of megabytes": (
        _endless_head("HTTP/1.1 200 OK", b"X-Big: " + b"a" * MiB, 8 * MiB),
        "header line longer than 8192 bytes",
    ),
    "header block of megabytes": (
        _endless_head("HTTP/1.1 200 OK", b"X-Filler: " + b"b" * 1000 + b"\r\n", 8 * MiB),
        "header block larger than 65536 bytes",
    ),
    "folded lines in a redirect's Location": (_folded_location, "obsolete line folding in a header"),
    "control character in a header": (_send("HTTP/1.1 200 OK\nX-Evil: a\x1b[2Jb"), "control character in header"),
    "space before a header's colon": (_send("HTTP/1.1 200 OK\nContent-Length : 5", b"AAAAA"), "malformed header"),
    # status line
    "not an HTTP response": (_send("SSH-2.0-OpenSSH_9.2"), "not an HTTP/1.x response"),
    "endless status line": (_then_endless_raw(b"HTTP/1.1 404 ", b"a"), "status line longer than 1024 bytes"),
    "endless interim responses": (
        _then_endless_raw(b"", b"HTTP/1.1 103 Early Hints\r\n\r\n"),
        "more than 8 interim (1xx) responses",
    ),
    "closed before answering": (lambda peer, bundle: None, "connection closed in the status line"),
    # trailers
    "endless trailers": (_then_endless(CHUNKED, b"0\r\n", b"X-Trailer: 1\r\n"), "more than 32 trailer fields"),
    "trailer of megabytes": (
        _then_endless(CHUNKED, b"0\r\nX-Trailer: ", b"t" * MiB, 8 * MiB),
        "trailer line longer than 8192 bytes",
    ),
    "trailer block of megabytes": (
        _then_endless(CHUNKED, b"0\r\n", b"X-Trailer: " + b"t" * 1000 + b"\r\n", 8 * MiB),
        "trailer block larger than 16384 bytes",
    ),
    # Content-Length
    "Content-Length longer than the body": (_length_longer_than_body, "body shorter than its Content-Length"),
    "Content-Length shorter than the body": (_length_shorter_than_body, "body longer than its Content-Length of 32"),
    "negative Content-Length": (_send("HTTP/1.1 200 OK\nContent-Length: -1"), "invalid Content-Length '-1'"),
    "Content-Length with a sign": (_send("HTTP/1.1 200 OK\nContent-Length: +64"), "invalid Content-Length '+64'"),
    "Content-Length of 20 digits": (
        _send("HTTP/1.1 200 OK\nContent-Length: 99999999999999999999"),
        "invalid Content-Length",
    ),
    "two different Content-Lengths": (
        _send("HTTP/1.1 200 OK\nContent-Length: 64\nContent-Length: 65"),
        "2 different Content-Length values",
    ),
    "Content-Length above the cap": (
        _send(f"HTTP/1.1 200 OK\nContent-Length: {1 << 60}"),
        "is larger than the cap of",
    ),
    # transfer codings
    "unsupported transfer coding": (
        _send("HTTP/1.1 200 OK\nTransfer-Encoding: gzip, chunked"),
        "unsupported Transfer-Encoding 'gzip, chunked'",
    ),
    "Transfer-Encoding and Content-Length": (
        _send(f"{CHUNKED}\nContent-Length: 64", b"40\r\n"),
        "both Transfer-Encoding and Content-Length",
    ),
    # redirects
    "redirect loop": (_send(f"{FOUND}\nLocation: /again"), "more than 5 redirects"),
    "redirect to ftp": (_send(f"{FOUND}\nLocation: ftp://example.invalid/u.otab"), "unsupported URL scheme 'ftp'"),
    "redirect to an overlong Location": (
        _send(f"{FOUND}\nLocation: /{'l' * 5000}"),
        "URL longer than 4096 characters",
    ),
    "redirect without Location": (_send(FOUND), "HTTP 302 redirect without a Location"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_response_is_refused_with_its_own_error_and_changes_nothing(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes, case: str
) -> None:
    script, fragment = CASES[case]
    # A safety net only: each case must fail on its own bound long before a stall.
    # One attempt: these are the bounds of one response (retries: test_http_resume.py).
    set_download(device, stall_bytes=1, stall_seconds=30, retries=0)
    server = hostile(lambda peer: script(peer, bundle_bytes))
    before = device.snapshot()
    assert_refused(device, before, server.url(), fragment)


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
def test_endless_body_beyond_the_cap_is_cut_off_before_anything_is_written(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes, framing: str
) -> None:
    cap = HEADER_SIZE + 100  # inside the manifest: refused before any slot is touched
    set_download(device, max_bytes=cap, stall_bytes=1, stall_seconds=30)  # the cap is never retried

    def script(peer: Peer) -> None:
        if framing == "chunked":
            pieces = (bundle_bytes[i : i + 16] for i in range(0, 4096, 16))
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
            if peer.send(response(CHUNKED, chunks)):
                peer.send_forever(b"10\r\n" + b"z" * 16 + b"\r\n")
        elif peer.send(response("HTTP/1.1 200 OK", bundle_bytes[:4096])):
            peer.send_forever(b"z")

    server = hostile(script)
    before = device.snapshot()
    # The chunked body is stopped by the first chunk that would cross the cap.
    fragment = f"would pass the cap of {cap}" if framing == "chunked" else f"more than {cap} bytes; refusing to read on"
    assert_refused(device, before, server.url(), fragment)


def test_a_reason_phrase_of_escapes_is_reported_short_and_on_one_line(
    device: SimDevice, hostile: Callable[[Script], HostileServer]
) -> None:
    reason = ("Not Found\x1b[2J" + "\u2028ota-agent: installed" * 30).encode()
    server = hostile(lambda peer: _send_raw(peer, b"HTTP/1.1 404 " + reason + b"\r\n\r\n"))
    before = device.snapshot()
    line = assert_refused(device, before, server.url(), "HTTP 404 Not Found")
    assert "\x1b" not in line
    assert "\u2028" not in line
    assert len(line) < 400
