"""TCP proxies in front of a registry, for the tests. `LoopbackProxy` accepts
on a loopback port and hands each connection to `_handle` in its own thread;
`DroppingProxy` drops the connection of the first whole-blob GET after
`cut_after` response bytes, so a client must resume with a Range request, and
records the requests it relayed. `close()` stops a proxy."""

from __future__ import annotations

import socket
import threading
from abc import ABC, abstractmethod


def read_head(client: socket.socket) -> bytes | None:
    """A request's head (and whatever of its body came with it); None when the client left first."""
    client.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        data = client.recv(65536)
        if not data:
            return None
        head += data
    return head


class LoopbackProxy(ABC):
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(client,), daemon=True)
            t.start()
            self._threads.append(t)

    @abstractmethod
    def _handle(self, client: socket.socket) -> None:
        """Serve one accepted connection (and close it)."""

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)
        for t in self._threads:
            t.join(5)


class DroppingProxy(LoopbackProxy):
    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.cut_after = cut_after
        self.requests: list[str] = []
        self.response_bytes = 0
        self._cut = False
        super().__init__(upstream_port)

    def _handle(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream, timeout=10) as up:
            head = read_head(client)
            if head is None:
                return
            first = head.split(b"\r\n", 1)[0].decode("latin-1")
            ranged = b"\r\nrange:" in head.lower()
            self.requests.append(first + (" (ranged)" if ranged else ""))
            cut = "/blobs/" in first and not ranged and not self._cut
            self._cut = self._cut or cut
            up.sendall(head)
            sent = 0
            while True:
                data = up.recv(65536)
                if not data:
                    return
                if cut and sent + len(data) > self.cut_after:
                    client.sendall(data[: self.cut_after - sent])
                    self.response_bytes += self.cut_after - sent
                    return  # the connection drops mid-body
                client.sendall(data)
                sent += len(data)
                self.response_bytes += len(data)
