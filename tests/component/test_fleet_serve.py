"""`ota-fleet serve`: a real HTTP server on a loopback port, read with a real
HTTP client: whole files, single byte ranges, validators and If-Range, and
nothing outside the served directory."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.fleet.serve import BundleServer, RangeNotSatisfiable, parse_range

DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[BundleServer, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "v2.otab").write_bytes(DATA)
    (root / ".hidden").write_bytes(b"secret")
    (tmp_path / "outside.txt").write_bytes(b"outside")
    os.symlink(tmp_path / "outside.txt", root / "link.otab")
    os.mkfifo(root / "fifo.otab")
    server = BundleServer(root, quiet=True)
    server.start()
    yield server, root
    server.stop()


def get(
    server: BundleServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[http.client.HTTPResponse, bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=10)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def test_whole_file_with_validators(served: tuple[BundleServer, Path]) -> None:
    response, body = get(served[0], "/v2.otab")
    assert response.status == 200
    assert body == DATA
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("ETag")
    assert response.getheader("Last-Modified")


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-99", 0, 99), ("bytes=1000-", 1000, len(DATA) - 1), ("bytes=-10", len(DATA) - 10, len(DATA) - 1),
     ("bytes=5-99999999", 5, len(DATA) - 1)],
)
def test_a_single_byte_range_is_served_as_206(
    served: tuple[BundleServer, Path], header: str, start: int, end: int
) -> None:
    response, body = get(served[0], "/v2.otab", {"Range": header})
    assert response.status == 206
    assert body == DATA[start : end + 1]
    assert response.getheader("Content-Range") == f"bytes {start}-{end}/{len(DATA)}"


def test_a_range_past_the_end_is_416_with_the_size(served: tuple[BundleServer, Path]) -> None:
    response, body = get(served[0], "/v2.otab", {"Range": f"bytes={len(DATA)}-"})
    assert response.status == 416
    assert response.getheader("Content-Range") == f"bytes */{len(DATA)}"
    assert body == b""


def test_if_range_with_a_stale_validator_gets_the_whole_new_file(served: tuple[BundleServer, Path]) -> None:
    server, _ = served
    first, _ = get(server, "/v2.otab", method="HEAD")
    etag = first.getheader("ETag")
    assert etag
    fresh, body = get(server, "/v2.otab", {"Range": "bytes=10-19", "If-Range": etag})
    assert (fresh.status, body) == (206, DATA[10:20])
    stale, body = get(server, "/v2.otab", {"Range": "bytes=10-19", "If-Range": '"not-the-etag"'})
    assert (stale.status, body) == (200, DATA)


@pytest.mark.parametrize("path", ["/../outside.txt", "/%2e%2e/outside.txt", "/.hidden", "/link.otab", "/fifo.otab",
                                  "/missing.otab", "/", "/sub%2Fdir"])
def test_nothing_outside_the_directory_nor_links_fifos_or_dot_files_is_served(
    served: tuple[BundleServer, Path], path: str
) -> None:
    response, body = get(served[0], path)
    assert response.status == 404
    assert b"secret" not in body
    assert b"outside" not in body


def test_several_ranges_or_a_malformed_range_serve_the_whole_file() -> None:
    assert parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=-", 100) is None
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-0", 100)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=50-10", 100)
