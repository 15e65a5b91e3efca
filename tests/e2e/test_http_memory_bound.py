"""The HTTP source's memory stays bounded whatever the server sends: a real
`ota-agent install URL` process against a chunk size of -1 followed by an
endless body (which made `http.client` buffer everything until the connection
closed), endless headers and endless trailers peaks far below the bound.

Peak RSS is the agent process's own `ru_maxrss` (`os.wait4` in a small launcher):
a memory assertion, not a timing one. The servers give up after `ENDLESS` (256 MiB), so a client
that buffers shows it in its peak instead of hanging the suite."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.e2e._hostile import ENDLESS, HostileServer, Peer, Script, open_head, response, servers, set_download
from tests.e2e._sim import ERROR_PREFIX, SimDevice

MiB = 1 << 20
RSS_BOUND = 100 * MiB
CHUNKED = "HTTP/1.1 200 OK\nTransfer-Encoding: chunked"


@pytest.fixture
def hostile() -> Iterator[Callable[[Script], HostileServer]]:
    yield from servers()


def _chunk_minus_one(peer: Peer) -> None:
    if peer.send(response(CHUNKED, b"-1\r\n")):
        peer.send_forever(b"A" * 4096, ENDLESS)


def _endless_headers(peer: Peer) -> None:
    if peer.send(open_head("HTTP/1.1 200 OK")):
        peer.send_forever(b"X-Filler: " + b"f" * 100 + b"\r\n", ENDLESS)


def _endless_trailers(peer: Peer) -> None:
    if peer.send(response(CHUNKED, b"0\r\n")):
        peer.send_forever(b"X-Trailer: " + b"t" * 100 + b"\r\n", ENDLESS)


SERVERS: dict[str, tuple[Script, str]] = {
    "chunk size -1 then an endless body": (_chunk_minus_one, "invalid chunk size '-1'"),
    "endless headers": (_endless_headers, "more than 100 header fields"),
    "endless trailers": (_endless_trailers, "more than 32 trailer fields"),
}


# A child's ru_maxrss starts from its parent's RSS at fork (Linux keeps the high-water
# mark across exec), and pytest is large: a small launcher forks the agent and
# reports the agent's own peak from os.wait4.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
print(usage.ru_maxrss, proc.returncode)
"""


def _install_peak_rss(device: SimDevice, url: str) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in bytes) of a real `ota-agent install URL`."""
    agent = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]
    run = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *agent, "-c", str(device.config), "install", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    maxrss_kib, rc = run.stdout.split()
    return int(rc), run.stderr, int(maxrss_kib) * 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.parametrize("case", list(SERVERS))
def test_install_against_an_endless_response_stays_far_below_the_memory_bound(
    device: SimDevice, hostile: Callable[[Script], HostileServer], case: str
) -> None:
    script, fragment = SERVERS[case]
    set_download(device, stall_bytes=1, stall_seconds=30, retries=0)  # a safety net only; one response
    server = hostile(script)
    rc, err, peak = _install_peak_rss(device, server.url())
    print(f"\npeak RSS of `ota-agent install` against {case}: {peak / MiB:.1f} MiB")
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert peak < RSS_BOUND, f"{peak / MiB:.1f} MiB"
