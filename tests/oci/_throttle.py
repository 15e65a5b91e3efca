"""A TCP proxy in front of a registry that answers some requests itself, as a
throttling or briefly overloaded registry does (429 / 503 with or without
`Retry-After`), and relays the others. One request per connection (the
registry client opens one for each). `refuse(n, request_line)` gets the
request's number (from 1) and its first line and returns a status line and
headers to answer with, or None to relay. Records every request line and
whether it was refused. Runs in threads; `close()` stops it."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable

from tests.oci._proxy import LoopbackProxy, read_head

Refusal = tuple[str, dict[str, str]] | None


class ThrottlingProxy(LoopbackProxy):
    def __init__(self, upstream_port: int, refuse: Callable[[int, str], Refusal]) -> None:
        self.refuse = refuse
        self.requests: list[tuple[str, bool]] = []
        self._lock = threading.Lock()
        super().__init__(upstream_port)

    def refused(self) -> list[str]:
        return [line for line, refused in self.requests if refused]

    def _handle(self, client: socket.socket) -> None:
        with client:
            head = read_head(client)
            if head is None:
                return
            first = head.split(b"\r\n", 1)[0].decode("latin-1")
            with self._lock:
                answer = self.refuse(len(self.requests) + 1, first)
                self.requests.append((first, answer is not None))
            if answer is not None:
                _drain_body(client, head)  # answered after the whole request, as a server does
                status, headers = answer
                lines = [f"HTTP/1.1 {status}", "Content-Length: 0", "Connection: close"]
                lines += [f"{k}: {v}" for k, v in headers.items()]
                client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
                return
            with socket.create_connection(self.upstream, timeout=10) as up:
                up.sendall(head)
                self._pump(client, up)

    @staticmethod
    def _pump(client: socket.socket, up: socket.socket) -> None:
        peers = {client: up, up: client}
        while True:
            ready, _, _ = select.select(list(peers), [], [], 10)
            if not ready:
                return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                peers[s].sendall(data)


def _drain_body(client: socket.socket, head: bytes) -> None:
    """Read the rest of the request's body (its Content-Length), so the answer does not
    race the client's upload into a reset."""
    top, _, body = head.partition(b"\r\n\r\n")
    length = 0
    for line in top.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or b"0")
    left = length - len(body)
    while left > 0:
        data = client.recv(min(left, 65536))
        if not data:
            return
        left -= len(data)
