"""Factory provisioning over the serial console: one device, and several in parallel.

Owns the provisioning benchmark. It makes an image (the seeded synthetic mix of
`install_vs_dd.py`: text-like, binary-like, random and zero extents), builds a
full bundle, creates N blank simulated devices (bootloader U-Boot, redundant env;
slots of the image's size), serves each device's console with `ota-agent console`
in its own process on one end of a pty relay (tests/e2e/_console.py: a
serial cable), and runs the station (`bundler.fleet.provision.run_station`, as
`ota-fleet provision` does) on the other ends with a factory CA.

Pty pairs do not enforce a baud rate, so the table gives two kinds of numbers:

* measured wall time per phase over the unthrottled ptys (connect: opening the
  line, JSON mode and the station's `provision-status`; identity: key made on the device, CSR signed;
  config; image: upload, both slots written and read back, bootloader, record);
* the time the upload takes on a real line: the bytes the upload put on the wire
  (frames, headers, CRCs; the device's credit lines go the other way) divided by
  the line's byte rate (8N1: baud / 10 bytes a second). At 3 Mbaud the line, not
  the device, is the limit: the estimate for a device is the fixed phases plus
  the line time plus the read-back (measured: the image phase minus its upload
  share is an upper bound of what the device adds after the last byte).

Usage: .venv/bin/python bench/provision.py [--size MiB] [--devices 1,4] [--baud 3000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.install_vs_dd import make_synthetic  # noqa: E402
from bundler.build import BundleSpec, build_full  # noqa: E402
from bundler.console.link import DeviceLink  # noqa: E402
from bundler.console.put import PutStats, put  # noqa: E402
from bundler.fleet.provision import DeviceRecord, Lines, Link, StationSpec, run_station  # noqa: E402
from bundler.fleet.provision_ca import load_ca, make_ca  # noqa: E402
from bundler.format.signing import generate_key  # noqa: E402
from tests.e2e._console import Relay, add_console  # noqa: E402
from tests.fixtures.factory import blank_device  # noqa: E402

MIB = 1 << 20
COMPATIBLE = "edge-ota-bench"


@dataclass
class Run:
    devices: int
    records: list[DeviceRecord]
    stats: dict[str, PutStats]
    wall: float


@contextlib.contextmanager
def devices(work: Path, n: int, keyring: Path, slot_size: int) -> Iterator[list[str]]:
    """N blank devices serving their consoles in child processes; yields the station's ports."""
    with contextlib.ExitStack() as stack:
        ports = []
        for i in range(n):
            relay = Relay()
            stack.callback(relay.close)
            config = blank_device(work / f"device{i}", backend="uboot", keyring=keyring, compatible=COMPATIBLE,
                                  slot_size=slot_size)
            add_console(config, relay.device.path, idle_timeout=600.0)
            cmd = [sys.executable, "-m", "agent.cli", "-c", str(config), "console", "--port", relay.device.path]
            proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(_stop, proc)
            ports.append(relay.host.path)
        for port in ports:  # every console answers before the clock starts
            link = DeviceLink(port, timeout=60.0)
            link.open()
            link.close()
        yield ports


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_once(work: Path, n: int, bundle: Path, *, keyring: Path, ca_dir: Path, slot_size: int) -> Run:
    ca = load_ca(ca_dir / "ca.key", ca_dir / "ca.pem")
    stats: dict[str, PutStats] = {}

    def upload(link: Link, path: Path, extra: str, progress: Any) -> dict[str, Any]:
        assert isinstance(link, DeviceLink)
        s = stats[link.port] = PutStats()
        return put(link, path, progress=lambda done, total: None, stats=s, reconnect=10.0)

    with devices(work, n, keyring, slot_size) as ports:
        spec = StationSpec(ports=tuple(ports), bundle=bundle, log=work / "factory.jsonl", ca=ca,
                           device_ids=tuple(f"bench-{i:03d}" for i in range(n)))
        links: list[Link] = [DeviceLink(p, timeout=60.0) for p in ports]
        started = time.monotonic()
        with open(os.devnull, "w") as quiet:
            records = run_station(spec, links, upload, lines=Lines(quiet))
        wall = time.monotonic() - started
    failed = [r for r in records if r.result != "provisioned"]
    if failed:
        raise SystemExit(f"provisioning failed: {failed[0].port}: {failed[0].reason}")
    return Run(n, records, stats, wall)


def table(runs: Sequence[Run], image_size: int, bundle_size: int, baud: int) -> None:
    line_rate = baud / 10  # bytes a second on an 8N1 line
    print(f"image {image_size / MIB:.0f} MiB, bundle {bundle_size / MIB:.1f} MiB; line {baud / 1e6:g} Mbaud 8N1 "
          f"= {line_rate / 1e3:.0f} kB/s; both slots written and read back per device")
    head = ("devices", "phase", "median s", "max s")
    print(f"{head[0]:>7}  {head[1]:<44} {head[2]:>10} {head[3]:>10}")
    for run in runs:
        phases = ["connect", "identity", "config", "image"]
        for ph in phases:
            vals = [r.phases_s.get(ph, 0.0) for r in run.records]
            print(f"{run.devices:>7}  {ph + ' (measured, unthrottled pty)':<44} {statistics.median(vals):>10.2f} "
                  f"{max(vals):>10.2f}")
        wire = [s.wire for s in run.stats.values()]
        payload = [s.payload for s in run.stats.values()]
        eff = sum(payload) / max(sum(wire), 1)
        line_s = [w / line_rate for w in wire]
        fixed = [sum(r.phases_s.get(p, 0.0) for p in ("connect", "identity", "config")) for r in run.records]
        images = [r.phases_s.get("image", 0.0) for r in run.records]
        total_meas = [r.duration_s for r in run.records]
        print(f"{run.devices:>7}  {'total per device (measured)':<44} {statistics.median(total_meas):>10.2f} "
              f"{max(total_meas):>10.2f}")
        print(f"{run.devices:>7}  {'station wall time (measured)':<44} {run.wall:>10.2f} {run.wall:>10.2f}")
        print(f"{run.devices:>7}  {f'framing efficiency (payload/wire) {eff:.4f}':<44} {'':>10} {'':>10}")
        label = f"upload on the line at {baud / 1e6:g} Mbaud (computed)"
        print(f"{run.devices:>7}  {label:<44} {statistics.median(line_s):>10.1f} {max(line_s):>10.1f}")
        low = [f + ls for f, ls in zip(fixed, line_s, strict=True)]
        high = [f + ls + im for f, ls, im in zip(fixed, line_s, images, strict=True)]
        label = f"total per device at {baud / 1e6:g} Mbaud (estimate)"
        print(f"{run.devices:>7}  {label:<44} {statistics.median(low):>10.1f} {max(high):>10.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image size in MiB (default 256)")
    parser.add_argument("--devices", default="1,4", help="device counts to run, comma-separated (default 1,4)")
    parser.add_argument("--baud", type=int, default=3_000_000, help="line rate for the computed times")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]
    if args.workdir:  # one that does not exist yet is made
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        image = work / "image.img"
        make_synthetic(image, args.size * MIB, args.seed)
        private, public = generate_key(work / "keys")
        bundle = work / "full.otab"
        started = time.monotonic()
        build_full(BundleSpec(image=image, key=private, version="1.0", security_version=1, compatible=COMPATIBLE,
                              threads=2), bundle)
        print(f"bundle built in {time.monotonic() - started:.1f} s")
        make_ca(work / "ca")
        runs = []
        for n in counts:
            d = work / f"run-{n}"
            d.mkdir()
            runs.append(run_once(d, n, bundle, keyring=public, ca_dir=work / "ca", slot_size=args.size * MIB))
        table(runs, image.stat().st_size, bundle.stat().st_size, args.baud)
    return 0


if __name__ == "__main__":
    sys.exit(main())
