"""A static bundle server for a lab (`ota-fleet serve DIR`): GET and HEAD of the
regular files directly inside DIR, with single byte ranges (`Range: bytes=a-b`,
`a-`, `-n`), `ETag` / `Last-Modified` validators and `If-Range`, so devices can
resume an interrupted download and fetch only the operations they need.

Owns only serving files; it knows nothing of the bundle format. Fleets use any
static HTTP origin or CDN instead; this is what a lab or a test needs. It never
serves anything outside DIR: names with a slash, dot-files, symlinks and
non-regular files answer 404.
"""

from __future__ import annotations

import email.utils
import http.server
import os
import re
import stat
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

COPY_CHUNK = 1 << 20
_RANGE = re.compile(r"\Abytes=(\d{0,19})-(\d{0,19})\Z")


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class RangeNotSatisfiable(ValueError):
    """The Range header names no byte of the file."""


def parse_range(header: str, size: int) -> ByteRange | None:
    """One byte range of a file of `size` bytes, or None for a header we serve whole
    (absent, malformed, or several ranges: RFC 9110 lets a server ignore Range)."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return ByteRange(max(size - n, 0), size - 1)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable(header)
    return ByteRange(start, end)


def etag_of(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


class BundleHandler(http.server.BaseHTTPRequestHandler):
    server_version = "ota-fleet-serve"
    protocol_version = "HTTP/1.1"
    directory: Path = Path(".")
    quiet = False

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def log_message(self, format: str, *args: object) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    def _file(self) -> tuple[Path, os.stat_result] | None:
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
            return None
        path = self.directory / name
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return (path, st) if stat.S_ISREG(st.st_mode) else None

    def _serve(self, *, body: bool) -> None:
        found = self._file()
        if found is None:
            self._empty(404, "not found")
            return
        path, st = found
        size = st.st_size
        etag = etag_of(st)
        last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        wanted: ByteRange | None = None
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if range_header and (if_range is None or if_range in (etag, last_modified)):
            try:
                wanted = parse_range(range_header, size)
            except RangeNotSatisfiable:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        start, length = (wanted.start, wanted.length) if wanted else (0, size)
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        self.send_header("Content-Length", str(length))
        if wanted:
            self.send_header("Content-Range", f"bytes {wanted.start}-{wanted.end}/{size}")
        self.end_headers()
        if not body:
            return
        try:
            with path.open("rb") as f:
                f.seek(start)
                remaining = length
                while remaining:
                    chunk = f.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        break  # the file shrank: the client sees a short body and retries
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _empty(self, code: int, text: str) -> None:
        data = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class BundleServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 overflows when a group of devices starts at once

    def __init__(self, directory: Path, bind: str = "127.0.0.1", port: int = 0, *, quiet: bool = False) -> None:
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} is not a directory")
        handler = type("Handler", (BundleHandler,), {"directory": directory.resolve(), "quiet": quiet})
        super().__init__((bind, port), handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="bundle-server", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

