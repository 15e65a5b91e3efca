"""HTTP/1.1 response framing over a connected socket, bounded whatever the
server sends: the response head (status line, header fields) and the body
(Content-Length, chunked, or delimited by the connection closing).

`Wire` is the socket with a small read buffer; every wait on it is bounded by
the transfer's `Pace`, and nothing is buffered beyond one line limit plus one
receive. `read_head()` parses a response head, skipping a bounded number of 1xx
responses; `Body` decodes the body of a 2xx response. The limits are
`HttpLimits`; obsolete line folding, control characters in fields, transfer
codings other than chunked/identity and ambiguous lengths are refused.

Connecting, TLS, requests and redirects are `agent.httpclient`'s. Every error
is a `SourceError` with a short message; foreign text in it passes `clean()`.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass

from agent.errors import SourceError
from agent.pace import Pace
from ota_common.text import clean

RECV_SIZE = 256 * 1024
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: (.*))?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_DIGITS = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    status_line: int = 1024
    header_line: int = 8192
    header_count: int = 100
    header_bytes: int = 64 * 1024
    interim: int = 8  # 1xx responses skipped before the final one
    chunk_line: int = 1024  # chunk size plus extensions
    chunk_digits: int = 16
    trailer_count: int = 32
    trailer_bytes: int = 16 * 1024
    redirects: int = 5
    location: int = 4096  # also the longest URL requested


@dataclass(frozen=True, slots=True)
class Headers:
    fields: tuple[tuple[str, str], ...]  # (lower-case name, value) in arrival order

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.fields if k == name]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return ", ".join(values) if values else None


class Wire:
    """A connected socket with a small read buffer; every wait is bounded by the pace."""

    def __init__(self, sock: socket.socket, pace: Pace) -> None:
        self._sock = sock
        self.pace = pace
        self._buf = bytearray()

    def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._sock.settimeout(self.pace.budget())
            try:
                sent = self._sock.send(view)
            except TimeoutError:
                sent = 0
            except OSError as e:
                self.pace.waited()
                self._alert()  # a TLS server that refused our certificate said why: raise that
                raise SourceError(self.pace.name, f"sending the request failed: {clean(e.strerror or e, 80)}") from None
            self.pace.waited()
            view = view[sent:]

    def _recv(self, n: int) -> bytes:
        while True:
            self._sock.settimeout(self.pace.budget())
            try:
                data = self._sock.recv(n)
            except TimeoutError:
                self.pace.waited()
                continue
            except ssl.SSLError as e:
                self.pace.waited()
                raise tls_error(self.pace.name, e) from None
            except OSError as e:
                self.pace.waited()
                reason = clean(e.strerror or e, 80)
                message = f"connection failed after {self.pace.received} bytes: {reason}"
                raise SourceError(self.pace.name, message) from None
            self.pace.waited()
            return data

    def _alert(self) -> None:
        """After a failed send on TLS: raise the alert the server sent, if one is waiting."""
        if not isinstance(self._sock, ssl.SSLSocket):
            return
        try:
            self._sock.settimeout(0.5)
            self._sock.recv(1)
        except ssl.SSLError as e:
            raise tls_error(self.pace.name, e) from None
        except OSError:
            return

    def buffered(self) -> bool:
        """Whether bytes already received wait in the buffer."""
        return bool(self._buf)

    def readline(self, limit: int, what: str, too_long: str = "") -> bytes:
        """One line including its LF, at most `limit` bytes; raises past the limit
        (with `too_long` as the message when given) or when the connection ends."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start, limit)
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            if len(self._buf) >= limit:
                raise SourceError(self.pace.name, too_long or f"{what} longer than {limit} bytes")
            start = len(self._buf)
            data = self._recv(RECV_SIZE)
            if not data:
                raise SourceError(self.pace.name, f"connection closed in the {what}")
            self._buf += data

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (at most one receive); b"" when the connection ended."""
        if self._buf:
            data = bytes(self._buf[:n])
            del self._buf[:n]
            return data
        return self._recv(min(n, RECV_SIZE))

    def more_now(self) -> bool:
        """Whether bytes beyond those read are already here (never waits)."""
        if self._buf:
            return True
        try:
            self._sock.settimeout(0.0)
            return bool(self._sock.recv(1))
        except OSError:  # BlockingIOError, ssl.SSLWantReadError, a reset: nothing more
            return False

    def close(self) -> None:
        self._sock.close()


_PEER_REFUSED = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
                 "HANDSHAKE_FAILURE", "ACCESS_DENIED", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED")


def tls_error(name: str, e: ssl.SSLError) -> SourceError:
    """A TLS failure after the handshake: the server's alert refusing our client
    certificate (configuration: not retried), or a damaged record (transient)."""
    reason = str(e.reason or e)
    if any(alert in reason.upper() for alert in _PEER_REFUSED):
        message = f"TLS: the server refused the connection ({clean(reason, 80)}); check client_cert and client_key"
        return SourceError(name, message, transient=False)
    return SourceError(name, f"TLS error: {clean(reason, 80)}")


def read_head(wire: Wire, limits: HttpLimits) -> tuple[int, str, Headers]:
    """(status, reason, headers) of the final response; the reason is already clean."""
    name = wire.pace.name
    for _ in range(limits.interim + 1):
        line = _strip_eol(wire.readline(limits.status_line, "status line"))
        match = _STATUS.fullmatch(line)
        if match is None:
            raise SourceError(name, f"not an HTTP/1.x response (status line {clean(line, 40)!r})")
        fields = read_fields(wire, limits, "header")
        status = int(match.group(1))
        if status == 101 or status < 100:
            raise SourceError(name, f"unexpected status {status}")
        if status >= 200:
            return status, clean(match.group(2) or b"", 60), Headers(tuple(fields))
    raise SourceError(name, f"more than {limits.interim} interim (1xx) responses")


def read_fields(wire: Wire, limits: HttpLimits, what: str) -> list[tuple[str, str]]:
    """Header (`what="header"`) or trailer fields up to the empty line, bounded in
    count, line length and total bytes."""
    name = wire.pace.name
    if what == "header":
        count, total = limits.header_count, limits.header_bytes
    else:
        count, total = limits.trailer_count, limits.trailer_bytes
    fields: list[tuple[str, str]] = []
    used = 0
    while True:
        room = total - used
        if room < 2:
            raise SourceError(name, f"{what} block larger than {total} bytes")
        too_long = "" if limits.header_line <= room else f"{what} block larger than {total} bytes"
        raw = wire.readline(min(limits.header_line, room), f"{what} line", too_long)
        used += len(raw)
        line = _strip_eol(raw)
        if not line:
            return fields
        if line[:1] in (b" ", b"\t"):
            raise SourceError(name, f"obsolete line folding in a {what} (a line continues the one before)")
        if len(fields) >= count:
            raise SourceError(name, f"more than {count} {what} fields")
        key, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(key):
            raise SourceError(name, f"malformed {what} line {clean(line, 40)!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise SourceError(name, f"control character in {what} {clean(key, 40)!r}")
        fields.append((key.decode("ascii").lower(), value.decode("latin-1")))


class Body:
    """The decoded body of a 2xx response, framed by its headers: `length` is the
    Content-Length when there is one; `read(n)` never returns more than `n` bytes,
    and no chunk or length may pass `cap`."""

    def __init__(self, wire: Wire, headers: Headers, cap: int, limits: HttpLimits) -> None:
        self._wire = wire
        self._name = wire.pace.name
        self._cap = cap
        self._limits = limits
        self.length: int | None = None
        self._chunked = False
        self._framing(headers)
        self._body = 0  # decoded bytes handed out
        self._chunk_left = 0
        self._chunks = 0
        self._done = False

    def _framing(self, headers: Headers) -> None:
        codings = [c.strip().lower() for v in headers.get_all("transfer-encoding") for c in v.split(",")]
        codings = [c for c in codings if c and c != "identity"]
        lengths = headers.get_all("content-length")
        if codings:
            if codings != ["chunked"]:
                text = clean(", ".join(codings), 60)
                raise SourceError(self._name, f"unsupported Transfer-Encoding {text!r} (only chunked)", transient=False)
            if lengths:
                raise SourceError(self._name, "both Transfer-Encoding and Content-Length (ambiguous body length)")
            self._chunked = True
            return
        if not lengths:
            return  # delimited by the connection closing
        values = {v.strip() for line in lengths for v in line.split(",")}
        if len(values) != 1:
            raise SourceError(self._name, f"{len(values)} different Content-Length values")
        (value,) = values
        if not _DIGITS.fullmatch(value):
            raise SourceError(self._name, f"invalid Content-Length {clean(value, 40)!r}")
        self.length = int(value)
        if self.length > self._cap:
            message = f"Content-Length {self.length} is larger than the cap of {self._cap} bytes"
            raise SourceError(self._name, message, transient=False)

    def read(self, n: int) -> bytes:
        if n <= 0 or self._done:
            return b""
        if self._chunked:
            data = self._read_chunked(n)
        elif self.length is not None:
            data = self._read_sized(n, self.length)
        else:
            data = self._wire.read(n)
        self._body += len(data)
        return data

    def _read_sized(self, n: int, length: int) -> bytes:
        left = length - self._body
        if left == 0:
            self._done = True
            if self._wire.more_now():
                raise SourceError(self._name, f"body longer than its Content-Length of {length} bytes")
            return b""
        data = self._wire.read(min(n, left))
        if not data:
            message = f"body shorter than its Content-Length: connection closed after {self._body} of {length} bytes"
            raise SourceError(self._name, message)
        return data

    def _read_chunked(self, n: int) -> bytes:
        while self._chunk_left == 0:
            if self._chunks:
                bad = f"chunk {self._chunks} is not followed by CRLF"
                if self._wire.readline(2, "line end after a chunk", bad) not in (b"\r\n", b"\n"):
                    raise SourceError(self._name, bad)
            size = self._chunk_size()
            self._chunks += 1
            if size == 0:
                self._wire.pace.phase = "reading trailers"
                read_fields(self._wire, self._limits, "trailer")
                self._wire.pace.phase = ""
                self._done = True
                return b""
            if size > self._cap - self._body:
                message = f"chunk of {size} bytes would pass the cap of {self._cap} bytes"
                raise SourceError(self._name, message, transient=False)
            self._chunk_left = size
        data = self._wire.read(min(n, self._chunk_left))
        if not data:
            raise SourceError(self._name, f"connection closed inside chunk {self._chunks} after {self._body} bytes")
        self._chunk_left -= len(data)
        return data

    def _chunk_size(self) -> int:
        lim = self._limits
        line = _strip_eol(self._wire.readline(lim.chunk_line, "chunk-size line"))
        text = line.split(b";", 1)[0].rstrip(b" \t")
        if not _HEX.fullmatch(text) or len(text) > lim.chunk_digits:
            raise SourceError(self._name, f"invalid chunk size {clean(text, 40)!r} (hex digits only)")
        return int(text, 16)


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
    return line[:-1] if line.endswith(b"\r") else line
