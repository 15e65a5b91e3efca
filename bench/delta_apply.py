"""Delta apply time and peak RSS on a simulated device, next to `dd`, for a delta
bundle that is already built (bench/delta.py builds them; a build takes minutes).

Owns the apply-only benchmark: it creates a simulated device booted from the
base (`ota-agent sim init`), then per run restores the device's state and
bootloader, drops the page cache and times `ota-agent install BUNDLE`
(the base check, every op, fsync, read-back), `dd bs=4M conv=fsync` of the new
image onto the same slot, `dd` plus an O_DIRECT read-back hashed by OpenSSL (what
the installer's read-back does), and `ota-agent status` (the CLI's start-up);
each with its wall time, CPU time (user + system of all its threads) and peak RSS.
`--compare DIR` also times the install with the code of another checkout
(PYTHONPATH=DIR, same virtualenv), for before/after tables. Not a pass/fail
test: it prints the targets (apply <= 2x dd, peak RSS < 64 MiB) next to the
numbers, and the load average, since a shared machine skews every time.

Usage: .venv/bin/python -m bench.delta_apply --base V1 --image V2 --bundle DELTA.otab --keyring KEY.pub
       [--runs N] [--compare DIR] [--workdir DIR] [--compatible STRING]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.install_vs_dd import Bench, Sample, compile_bytecode, digest_tool, scratch_dir

MIB = 1 << 20
TARGET_RATIO = 2.0
TARGET_RSS_MIB = 64.0


def restore(device: Path) -> None:
    shutil.rmtree(device / "state")
    shutil.copytree(device / "state.orig", device / "state")
    shutil.copyfile(device / "bootloader.json.orig", device / "bootloader.json")


def row(name: str, samples: list[Sample]) -> tuple[str, float, str, float, float]:
    """(step, median wall s, range, median CPU s, peak RSS MiB)."""
    times = [s.seconds for s in samples]
    spread = f"{min(times):.2f}-{max(times):.2f}" if len(times) > 1 else ""
    cpu = statistics.median(s.cpu_s for s in samples)
    return name, statistics.median(times), spread, cpu, max(s.rss_mib for s in samples)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--keyring", type=Path, required=True)
    ap.add_argument("--compatible", default="edge-ota-bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", type=Path, help="a checkout whose code is timed too (PYTHONPATH)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    work = scratch_dir(args.workdir, "delta-apply-")
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    bench = Bench(work, Path(sys.executable).parent)
    device = work / "device"
    size = max(args.base.stat().st_size, args.image.stat().st_size)
    subprocess.run([bench.tool("ota-agent"), "sim", "init", str(device), "--image", str(args.base), "--keyring",
                    str(args.keyring), "--compatible", args.compatible, "--slot-size", str(-(-size // MIB) * MIB)],
                   check=True, capture_output=True)
    shutil.copytree(device / "state", device / "state.orig")
    shutil.copyfile(device / "bootloader.json", device / "bootloader.json.orig")
    config = str(device / "agent.toml")
    install = [bench.tool("ota-agent"), "-c", config, "install", str(args.bundle)]
    slot = device / "slot-B.img"
    dd = ["dd", f"if={args.image}", f"of={slot}", "bs=4M", "conv=fsync,notrunc", "status=none"]
    readback = f"dd if={shlex.quote(str(slot))} bs=4M iflag=direct status=none | {digest_tool()} >/dev/null"
    steps: dict[str, list[str]] = {"ota-agent install (this tree)": install}
    if args.compare is not None:
        compile_bytecode(args.compare)
        steps[f"ota-agent install ({args.compare})"] = ["env", f"PYTHONPATH={args.compare}", *install]
    steps["dd conv=fsync"] = dd
    steps["dd + read-back"] = ["sh", "-c", f"{shlex.join(dd)} && {readback}"]
    steps["ota-agent status (start-up)"] = [bench.tool("ota-agent"), "-c", config, "status"]
    samples: dict[str, list[Sample]] = {name: [] for name in steps}
    loads = []
    for i in range(args.runs):
        for name, argv in steps.items():
            restore(device)
            samples[name].append(bench.measure(argv))
            loads.append(os.getloadavg()[0])
        print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{n} {s[-1].seconds:.2f} s" for n, s in samples.items()),
              flush=True)
    print(f"\n{args.bundle.name}: {args.base.name} -> {args.image.name} ({args.image.stat().st_size:,} B), "
          f"{os.cpu_count()} CPUs, load average during the runs {min(loads):.1f}-{max(loads):.1f}, "
          f"page cache dropped before each step: {'yes' if bench.can_drop else 'no (needs root)'}\n")
    rows = [row(name, s) for name, s in samples.items()]
    print("| step | median s | range s | CPU s (user + sys) | peak RSS MiB |\n|---|---:|---:|---:|---:|")
    for name, median, spread, cpu, rss in rows:
        print(f"| {name} | {median:.2f} | {spread} | {cpu:.2f} | {rss:.1f} |")
    by = {name: median for name, median, _, _, _ in rows}
    ours, dd_s = by["ota-agent install (this tree)"], by["dd conv=fsync"]
    start = by["ota-agent status (start-up)"]
    rss = max(s.rss_mib for s in samples["ota-agent install (this tree)"])
    print(f"\napply {ours / dd_s:.1f}x dd conv=fsync (target <= {TARGET_RATIO:.0f}x); without the CLI start-up "
          f"{(ours - start) / dd_s:.1f}x; {ours / by['dd + read-back']:.1f}x dd + read-back; "
          f"peak RSS {rss:.1f} MiB (target < {TARGET_RSS_MIB:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
