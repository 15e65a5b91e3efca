"""The bounded HTTP client still installs from every well-formed response a real
server may send: chunked with extensions and trailers, interim 1xx responses,
relative redirects, a body delimited by the connection closing (HTTP/1.0), and
a Content-Length body from a server that keeps the connection open after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e._hostile import HostileServer, Peer, Script, response, servers
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


@pytest.fixture
def hostile() -> Iterator[Callable[[Script], HostileServer]]:
    yield from servers()


@pytest.fixture
def bundle_bytes(make_bundle: BundleFactory) -> bytes:
    return Path(make_bundle("2.0")).read_bytes()


def _chunked(data: bytes) -> bytes:
    out = bytearray()
    sizes = [1, 7, 4096, 65536, 1 << 20, 333]
    pos = i = 0
    while pos < len(data):
        piece = data[pos : pos + sizes[i % len(sizes)]]
        ext = b";name=value;flag" if i % 2 else b""
        out += b"%X%s\r\n%s\r\n" % (len(piece), ext, piece)
        pos += len(piece)
        i += 1
    return bytes(out) + b"0\r\nX-Checksum: none\r\nX-Other: 1\r\n\r\n"


def _request_path(peer: Peer) -> str:
    return peer.request.split(b" ", 2)[1].decode()


def _assert_installed(device: SimDevice, url: str) -> None:
    device.install_ok(url)
    doc = device.status()
    assert (doc["primary"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "trial", "2.0")
    assert doc["last_result"]["result"] == "ok"


def test_installs_from_a_chunked_body_with_extensions_and_trailers(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    body = _chunked(bundle_bytes)
    server = hostile(lambda peer: peer.send(response("HTTP/1.1 200 OK\nTransfer-Encoding: chunked", body)))
    _assert_installed(device, server.url())


def test_installs_after_interim_responses(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    head = f"HTTP/1.1 200 OK\nContent-Length: {len(bundle_bytes)}"
    server = hostile(lambda peer: peer.send(interim + response(head, bundle_bytes)))
    _assert_installed(device, server.url())


def test_installs_through_relative_redirects(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    def script(peer: Peer) -> None:
        path = _request_path(peer)
        if path == "/start/update.otab":
            peer.send(response("HTTP/1.1 301 Moved Permanently\nLocation: ../mirror/a%20b.otab\nContent-Length: 0"))
        elif path == "/mirror/a%20b.otab":
            peer.send(response("HTTP/1.1 307 Temporary Redirect\nLocation: /final/update.otab?sig=x y"))
        elif path == "/final/update.otab?sig=x%20y":
            peer.send(response(f"HTTP/1.1 200 OK\nContent-Length: {len(bundle_bytes)}", bundle_bytes))
        else:
            peer.send(response("HTTP/1.1 404 Not Found\nContent-Length: 0"))

    server = hostile(script)
    _assert_installed(device, server.url("start/update.otab"))
    assert [r.split(b" ", 2)[1] for r in server.requests] == [
        b"/start/update.otab",
        b"/mirror/a%20b.otab",
        b"/final/update.otab?sig=x%20y",
    ]


def test_installs_from_a_body_ended_by_the_connection_closing(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    server = hostile(lambda peer: peer.send(response("HTTP/1.0 200 OK", bundle_bytes)))
    _assert_installed(device, server.url())


def test_a_server_keeping_the_connection_open_after_the_body_does_not_hold_the_install(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    def script(peer: Peer) -> None:
        if peer.send(response(f"HTTP/1.1 200 OK\nContent-Length: {len(bundle_bytes)}", bundle_bytes)):
            peer.hold()

    server = hostile(script)
    _assert_installed(device, server.url())


def test_the_request_is_a_plain_bounded_get(
    device: SimDevice, hostile: Callable[[Script], HostileServer], bundle_bytes: bytes
) -> None:
    head = f"HTTP/1.1 200 OK\nContent-Length: {len(bundle_bytes)}"
    server = hostile(lambda peer: peer.send(response(head, bundle_bytes)))
    _assert_installed(device, server.url())
    (request,) = server.requests
    lines = request.split(b"\r\n")
    assert lines[0] == b"GET /update.otab HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"Connection: close" in lines
    assert b"Accept-Encoding: identity" in lines
