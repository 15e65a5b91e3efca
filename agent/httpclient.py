"""A small HTTP/1.1 GET client over `socket` and `ssl` (stdlib only) that bounds
memory, time and the text of its errors whatever the server sends.

`HttpClient.get(url, pace, cap=..., range_start=None, range_end=None,
if_range=None)` resolves and connects within `connect_timeout` (directly, or
through an `http://` proxy: CONNECT for https, absolute-form requests for
http), does the TLS handshake with the caller's `ssl.SSLContext` (the system
CA store by default; a client certificate is the context's), sends one GET
(with `Range: bytes=N-[M]` and `If-Range` when asked, and the configured extra
headers), follows at most `HttpLimits.redirects` redirects (Location bounded,
relative ones resolved, http/https only, never from https down to http; the
extra headers only to the origin they were configured for) and returns the
final `HttpResponse` whatever its status: `status`, `reason`, `headers`,
`length` (Content-Length), `total` (size of the whole resource), `range_start`
(first byte of a 206) and a bounded `read(n)` over the decoded body. What a
status means, retrying and resuming belong to the caller (`agent.ranged`).
Extra header values are never logged or put in an error.

The framing rules and their bounds are `agent.httpwire`'s. Every wait after
connecting is bounded by the transfer's `Pace`; body bytes are the only
progress it counts. Errors are `SourceError`s naming the URL the caller asked
for; malformed responses are transient (a middlebox may have garbled them),
what configuration decides (scheme, cap, codings, redirect count) is not.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import SourceError
from agent.httpwire import Body, Headers, HttpLimits, Wire, read_head, tls_error
from agent.pace import Pace
from ota_common.text import clean

USER_AGENT = "edge-ota-agent/0.1"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HOST = re.compile(r"[A-Za-z0-9._\-:]+")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")
_PATH_SAFE = "/%?&=:@!$'()*+,;~-._[]"
_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str  # request target: path and query, percent-encoded

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class HttpResponse:
    """The final response of a GET. Only a 2xx response has a body to `read()`."""

    def __init__(
        self, wire: Wire, url: str, status: int, reason: str, headers: Headers, *, cap: int, limits: HttpLimits
    ) -> None:
        self._wire = wire
        self._pace = wire.pace
        self.url = url  # after redirects
        self.status = status
        self.reason = reason
        self.headers = headers
        self._body = Body(wire, headers, cap, limits) if 200 <= status < 300 else None
        self.length = self._body.length if self._body else None
        self.range_start: int | None = None  # a 206's Content-Range: first and last byte
        self.range_end: int | None = None
        self.total = self._total()

    def _total(self) -> int | None:
        if self.status != 206:
            return self.length
        match = _CONTENT_RANGE.fullmatch((self.headers.get("content-range") or "").strip())
        if match is None:
            return None
        self.range_start, self.range_end = int(match.group(1)), int(match.group(2))
        return None if match.group(3) == "*" else int(match.group(3))

    def read(self, n: int, /) -> bytes:
        """Up to `n` body bytes; b"" at the end of the body."""
        if self._body is None:
            return b""
        data = self._body.read(n)
        self._pace.delivered(len(data))
        return data

    def close(self) -> None:
        self._wire.close()


class HttpClient:
    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 30.0,
        limits: HttpLimits | None = None,
        user_agent: str = USER_AGENT,
        headers: Sequence[tuple[str, str]] = (),
        proxy: str | None = None,
        no_proxy: Sequence[str] = (),
    ) -> None:
        self._tls = tls
        self.connect_timeout = connect_timeout
        self.limits = limits or HttpLimits()
        self.user_agent = user_agent
        self.headers = tuple(headers)  # extra request headers (a bearer token): values never logged
        self.proxy = parse_url(proxy, "proxy", self.limits.location) if proxy else None
        if self.proxy is not None and self.proxy.scheme != "http":
            raise SourceError("proxy", "only http:// proxy URLs are supported", transient=False)
        self.no_proxy = tuple(h.strip().lower().lstrip(".") for h in no_proxy if h.strip())

    def get(
        self,
        url: str,
        pace: Pace,
        *,
        cap: int,
        range_start: int | None = None,
        range_end: int | None = None,
        if_range: str | None = None,
    ) -> HttpResponse:
        """GET `url`, following redirects; errors name `pace.name`. `range_end` is
        inclusive (RFC 9110), `if_range` the validator the range must still match."""
        name = pace.name
        hops = 0
        origin = parse_url(url, name, self.limits.location)
        while True:
            target = parse_url(url, name, self.limits.location)
            if hops and origin.scheme == "https" and target.scheme != "https":
                message = f"refusing a redirect from https to {clean(target.url, 200)}"
                raise SourceError(name, message, transient=False)
            same_origin = (target.scheme, target.host.lower(), target.port) == (
                origin.scheme,
                origin.host.lower(),
                origin.port,
            )
            wire, via_proxy = self._connect(target, pace)
            try:
                request = self._request(
                    target, range_start, range_end, if_range, absolute=via_proxy, extra=same_origin
                )
                wire.send_all(request)
                pace.phase = "waiting for the response"
                status, reason, headers = read_head(wire, self.limits)
                pace.phase = ""
                if status not in REDIRECTS:
                    return HttpResponse(wire, target.url, status, reason, headers, cap=cap, limits=self.limits)
            except BaseException:
                wire.close()
                raise
            wire.close()
            location = headers.get_all("location")
            if len(location) != 1:
                what = "without a Location" if not location else "with several Location headers"
                raise SourceError(name, f"HTTP {status} redirect {what}")
            hops += 1
            if hops > self.limits.redirects:
                raise SourceError(name, f"more than {self.limits.redirects} redirects", transient=False)
            url = urllib.parse.urljoin(target.url, location[0])

    def _request(
        self,
        target: Target,
        range_start: int | None,
        range_end: int | None,
        if_range: str | None,
        *,
        absolute: bool,
        extra: bool,
    ) -> bytes:
        where = f"{target.scheme}://{target.host_header}{target.path}" if absolute else target.path
        lines = [
            f"GET {where} HTTP/1.1",
            f"Host: {target.host_header}",
            f"User-Agent: {self.user_agent}",
            "Accept: */*",
            "Accept-Encoding: identity",
            "Connection: close",
        ]
        if range_start is not None:
            lines.append(f"Range: bytes={range_start}-{'' if range_end is None else range_end}")
            if if_range is not None:
                lines.append(f"If-Range: {if_range}")
        if extra:  # configured for this origin: not sent on to another host a redirect names
            lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _proxied(self, target: Target) -> bool:
        if self.proxy is None:
            return False
        host = target.host.lower()
        return not any(h in ("*", host) or host.endswith("." + h) for h in self.no_proxy)

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()  # the system CA store
        return self._tls

    def _connect(self, target: Target, pace: Pace) -> tuple[Wire, bool]:
        """A wire to `target` (TLS done for https) and whether requests on it go to
        an http proxy in absolute form (plain http through the proxy)."""
        name = pace.name
        timeout = min(self.connect_timeout, pace.remaining())
        end = time.monotonic() + timeout
        proxy = self.proxy if self._proxied(target) else None
        peer = proxy or target
        sock = self._tcp(peer, end, timeout, name)
        if proxy is not None and target.scheme == "https":
            sock = self._tunnel(sock, target, pace)
        if target.scheme == "https":
            sock = self._handshake(sock, target, end, name)
        return Wire(sock, pace), proxy is not None and target.scheme == "http"

    def _tunnel(self, sock: socket.socket, target: Target, pace: Pace) -> socket.socket:
        """CONNECT through the proxy; the TLS handshake then runs inside the tunnel."""
        authority = f"[{target.host}]:{target.port}" if ":" in target.host else f"{target.host}:{target.port}"
        request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {self.user_agent}\r\n\r\n"
        wire = Wire(sock, pace)
        try:
            wire.send_all(request.encode("ascii"))
            pace.phase = "waiting for the proxy"
            status, reason, _ = read_head(wire, self.limits)
            pace.phase = ""
        except BaseException:
            sock.close()
            raise
        if status != 200:
            sock.close()
            transient = status >= 500 or status in (408, 429)
            message = f"proxy refused CONNECT to {authority}: HTTP {status} {reason}".rstrip()
            raise SourceError(pace.name, message, transient=transient, status_code=status)
        if wire.buffered():
            sock.close()
            raise SourceError(pace.name, "proxy sent bytes before the TLS handshake")
        return sock

    def _tcp(self, target: Target, end: float, timeout: float, name: str) -> socket.socket:
        sock: socket.socket | None = None
        last = "no address"
        for family, kind, proto, _, addr in _resolve(target.host, target.port, timeout, name):
            left = end - time.monotonic()
            if left <= 0:
                last = f"timed out after {timeout:g} s"
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                sock.connect(addr)
                break
            except TimeoutError:
                last = f"timed out after {timeout:g} s"
            except OSError as e:
                last = e.strerror or str(e)
            sock.close()
            sock = None
        if sock is None:
            what = "proxy " if target is self.proxy else ""
            raise SourceError(name, f"cannot connect to {what}{target.host_header}: {clean(last, 120)}")
        return sock

    def _handshake(self, sock: socket.socket, target: Target, end: float, name: str) -> socket.socket:
        try:
            sock.settimeout(max(end - time.monotonic(), 0.01))
            return self._context().wrap_socket(sock, server_hostname=target.host)
        except ssl.SSLCertVerificationError as e:
            sock.close()
            reason = clean(e.verify_message or e.reason or "certificate verify failed", 120)
            raise SourceError(name, f"TLS: server certificate not trusted: {reason}", transient=False) from None
        except TimeoutError:
            sock.close()
            raise SourceError(name, "cannot connect: TLS handshake timed out") from None
        except ssl.SSLError as e:
            sock.close()
            raise tls_error(name, e) from None
        except OSError as e:
            sock.close()
            raise SourceError(name, f"TLS handshake failed: {clean(e, 120)}") from None


def parse_url(url: str, name: str, limit: int) -> Target:
    """An http(s) URL as a request target; refuses what cannot be requested safely."""
    if len(url) > limit:
        raise SourceError(name, f"URL longer than {limit} characters", transient=False)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise SourceError(name, f"invalid URL {clean(url, 120)!r}: {clean(e, 80)}", transient=False) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        message = f"unsupported URL scheme {clean(scheme, 20)!r} in {clean(url, 120)!r} (use http or https)"
        raise SourceError(name, message, transient=False)
    host = parts.hostname or ""
    if not _HOST.fullmatch(host):
        raise SourceError(name, f"invalid host in URL {clean(url, 120)!r}", transient=False)
    if parts.username is not None:
        raise SourceError(name, "credentials in the URL are not supported", transient=False)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    path = urllib.parse.quote(path, safe=_PATH_SAFE)
    return Target(url, scheme, host, port or (443 if scheme == "https" else 80), path)


def _resolve(host: str, port: int, timeout: float, name: str) -> list[_AddrInfo]:
    """getaddrinfo bounded by `timeout` (the resolver has no timeout of its own)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        try:
            return list(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST))
        except OSError as e:
            raise SourceError(name, f"cannot connect: {clean(e, 120)}") from None
    result: list[list[_AddrInfo] | OSError] = []

    def run() -> None:
        try:
            result.append(list(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        except OSError as e:
            result.append(e)

    worker = threading.Thread(target=run, name="resolve", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise SourceError(name, f"cannot connect: resolving {host!r} took longer than {timeout:g} s")
    found = result[0]
    if isinstance(found, OSError):
        reason = found.strerror or str(found)
        raise SourceError(name, f"cannot connect: cannot resolve {host!r}: {clean(reason, 80)}")
    return found
