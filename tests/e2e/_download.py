"""Helpers for the resumable-download tests: a `[download]` table with any TOML
values (strings, lists, an inline headers table), and a real origin (the lab
bundle server `ota-fleet serve` uses, with Range, ETag and If-Range) behind the
fault-injecting proxy, with variants that ignore Range or answer a status."""

from __future__ import annotations

import http.server
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bundler.fleet.serve import BundleHandler, BundleServer
from tests.e2e._sim import SimDevice
from tests.fixtures.faultproxy import FaultProxy

FAST_RETRIES = {"retries": 4, "retry_backoff": 0.01, "retry_backoff_max": 0.05, "stall_bytes": 1024,
                "stall_seconds": 1}


def toml_value(v: object) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    return str(v).lower() if isinstance(v, bool) else str(v)


def download_table(device: SimDevice, **values: object) -> None:
    """Append a `[download]` table (FAST_RETRIES, overridden by `values`) to agent.toml."""
    table = "".join(f"{k} = {toml_value(v)}\n" for k, v in ({**FAST_RETRIES, **values}).items())
    device.config.write_text(device.config.read_text() + f"\n[download]\n{table}")


class _Variants(BundleHandler):
    """`/status/N/NAME` answers HTTP N; with `ignore_range` every Range is ignored."""

    ignore_range = False

    def do_GET(self) -> None:
        parts = self.path.split("/")
        if len(parts) == 4 and parts[1] == "status":
            self._empty(int(parts[2]), "scripted status")
            return
        if self.ignore_range:
            del self.headers["Range"]
        super().do_GET()


@dataclass
class Origin:
    root: Path
    server: BundleServer
    proxy: FaultProxy

    def publish(self, bundle: Path, name: str = "update.otab") -> str:
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(bundle.read_bytes())
        os.replace(tmp, self.root / name)  # a new inode: a new ETag
        return name

    def url(self, name: str = "update.otab") -> str:
        return self.proxy.url(name)

    def ranges(self) -> list[str | None]:
        """The Range header of each request that reached the proxy, in order."""
        out: list[str | None] = []
        for request in self.proxy.requests:
            found = [line[7:].decode() for line in request.split(b"\r\n") if line.lower().startswith(b"range: ")]
            out.append(found[0] if found else None)
        return out


def origin(root: Path, *, ignore_range: bool = False) -> Iterator[Origin]:
    root.mkdir()
    server = BundleServer(root, quiet=True)
    handler = server.RequestHandlerClass
    server.RequestHandlerClass = type("Handler", (_Variants, handler), {"ignore_range": ignore_range})
    assert issubclass(server.RequestHandlerClass, http.server.BaseHTTPRequestHandler)
    server.start()
    proxy = FaultProxy(server.server_address[1])
    try:
        yield Origin(root, server, proxy)
    finally:
        proxy.close()
        server.stop()
