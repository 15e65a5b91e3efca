"""Installs over a network that drops connections: bytes downloaded and time.

Owns the resumable-download benchmark. It builds a synthetic image (256 MiB by
default, the seeded mix of `install_vs_dd.py`), a full bundle, and a simulated
device; serves the bundle with the lab bundle server (`ota-fleet serve`'s:
Range, ETag, If-Range) behind the test suite's fault-injecting TCP proxy
(`tests/fixtures/faultproxy.py`), and for 0, 1, 5 and 20 connection drops per
transfer (an RST after every 1/(N+1) of the bundle) measures:

- `ota-agent install URL --reinstall` (verify, stream into slot B, read back),
  with the `[download]` defaults except the backoff: `retry_backoff = 1`,
  `retry_backoff_max = 1` (each retry waits 1-2 s, jitter included), so that it
  waits like curl's `--retry-delay 1`;
- `curl --retry 20 -C - --retry-delay 1 -o FILE URL` fetching the same file
  through the same proxy to local disk (what a shell script would do), and the
  same with `--retry-all-errors` (curl 7.71+), because plain `--retry` does not
  retry a reset connection.

Bytes are counted by the proxy (everything it relayed to the client: headers
included) and, for the agent, also by the agent itself (`downloaded` in its
result). Not a pass/fail test: it prints one table.

Usage: .venv/bin/python -m bench.http_faults [--size MiB] [--drops 0,1,5,20] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.install_vs_dd import make_synthetic, scratch_dir
from bundler.fleet.serve import BundleServer
from tests.fixtures.faultproxy import FaultProxy, Faults

MIB = 1 << 20
COMPATIBLE = "edge-ota-bench"
DOWNLOAD = """
[download]
retry_backoff = 1
retry_backoff_max = 1
stall_seconds = 30
"""


@dataclass(frozen=True, slots=True)
class Row:
    tool: str
    drops: int
    ok: bool
    seconds: float
    wire: int  # bytes the proxy relayed to the client
    counted: int | None  # bytes the tool says it downloaded
    note: str = ""


def tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def prepare(work: Path, size: int) -> tuple[Path, Path]:
    keys = work / "keys"
    subprocess.run([tool("ota-bundle"), "keygen", str(keys)], check=True, capture_output=True)
    image, factory = work / "image.img", work / "factory.img"
    t0 = time.perf_counter()
    make_synthetic(image, size, 1)
    make_synthetic(factory, 8 * MIB, 2)
    www = work / "www"
    www.mkdir()
    bundle = www / "bundle.otab"
    create = [tool("ota-bundle"), "create", "--image", str(image), "--key", str(keys / "signing.key"),
              "--version", "2.0", "--security-version", "1", "--compatible", COMPATIBLE, "-o", str(bundle)]
    subprocess.run(create, check=True, capture_output=True)
    device = work / "device"
    init = [tool("ota-agent"), "sim", "init", str(device), "--image", str(factory), "--keyring",
            str(keys / "signing.pub"), "--compatible", COMPATIBLE, "--slot-size", str(size)]
    subprocess.run(init, check=True, capture_output=True)
    config = device / "agent.toml"
    config.write_text(config.read_text() + DOWNLOAD)
    print(f"image {size // MIB} MiB, bundle {bundle.stat().st_size / MIB:.1f} MiB, "
          f"ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return bundle, config


def drops_script(proxy: FaultProxy, size: int, drops: int) -> None:
    proxy.script.clear()
    proxy.then(*[Faults(reset_after=size // (drops + 1))] * drops)


def run_agent(proxy: FaultProxy, config: Path, size: int, drops: int) -> Row:
    drops_script(proxy, size, drops)
    before = proxy.sent
    cmd = [tool("ota-agent"), "-c", str(config), "install", "--reinstall", "--json", proxy.url("bundle.otab")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    counted = None
    note = ""
    if done.returncode == 0:
        doc = json.loads(done.stdout)  # `install --json`: the result object, `downloaded` in it
        counted = doc.get("downloaded") if isinstance(doc, dict) else None
    else:
        note = (done.stderr.strip().splitlines() or ["failed"])[-1][:100]
    return Row("ota-agent install", drops, done.returncode == 0, seconds, proxy.sent - before, counted, note)


def run_curl(proxy: FaultProxy, out: Path, bundle: Path, drops: int, *, all_errors: bool) -> Row:
    drops_script(proxy, bundle.stat().st_size, drops)
    out.unlink(missing_ok=True)
    before = proxy.sent
    cmd = ["curl", "-sS", "--retry", "20", "--retry-delay", "1", "-C", "-", "-o", str(out), proxy.url("bundle.otab")]
    if all_errors:
        cmd[2:2] = ["--retry-all-errors"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    same = done.returncode == 0 and out.exists() and out.stat().st_size == bundle.stat().st_size
    same = same and _same(out, bundle)
    note = "" if same else (f"rc {done.returncode}: " + (done.stderr.strip().splitlines() or [""])[-1])[:100]
    name = "curl --retry 20 -C -" + (" --retry-all-errors" if all_errors else "")
    return Row(name, drops, same, seconds, proxy.sent - before, out.stat().st_size if out.exists() else 0, note)


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as x, b.open("rb") as y:
        while True:
            p, q = x.read(MIB), y.read(MIB)
            if p != q:
                return False
            if not p:
                return True


def print_table(rows: list[Row], bundle_size: int) -> None:
    print()
    print(f"bundle: {bundle_size} bytes ({bundle_size / MIB:.1f} MiB); wire = bytes the proxy relayed "
          "(headers included); counted = what the tool reports (agent: `downloaded`; curl: file size)")
    print(f"{'tool':<40} {'drops':>5} {'result':>7} {'time s':>7} {'wire MiB':>9} {'x bundle':>8} {'counted MiB':>11}")
    for r in rows:
        counted = f"{r.counted / MIB:.1f}" if r.counted is not None else "-"
        print(f"{r.tool:<40} {r.drops:>5} {'ok' if r.ok else 'FAILED':>7} {r.seconds:>7.1f} "
              f"{r.wire / MIB:>9.1f} {r.wire / bundle_size:>8.3f} {counted:>11}")
        if r.note:
            print(f"{'':<40}   {r.note}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image size in MiB (default 256)")
    parser.add_argument("--drops", default="0,1,5,20", help="connection drops per transfer (default 0,1,5,20)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    if shutil.which("curl") is None:
        print("curl not found: apt-get install curl", file=sys.stderr)
        return 2
    drops = [int(d) for d in args.drops.split(",")]
    work = scratch_dir(args.workdir, "bench-http-")
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=False).stdout.split()[1]
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, curl {curl}; "
          f"scratch {work}", flush=True)
    server: BundleServer | None = None
    proxy: FaultProxy | None = None
    try:
        bundle, config = prepare(work, args.size * MIB)
        server = BundleServer(bundle.parent, quiet=True)
        server.start()
        proxy = FaultProxy(server.server_address[1])
        size = bundle.stat().st_size
        rows: list[Row] = []
        for n in drops:
            rows.append(run_agent(proxy, config, size, n))
            print(rows[-1], flush=True)
            for all_errors in (False, True):
                rows.append(run_curl(proxy, work / "curl.out", bundle, n, all_errors=all_errors))
                print(rows[-1], flush=True)
        print_table(rows, size)
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
