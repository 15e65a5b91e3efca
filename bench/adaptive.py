"""Adaptive download on real Debian images: bytes a device holding the base downloads
when it installs the *full* bundle of the new image with `[download] adaptive = true`.

Owns the adaptive-download benchmark: for each image pair of the corpus (as
bench/delta.py finds it: --corpus, else $CORPUS, else bench/corpus; it is not
built here) it builds the full bundle of v2, serves it with `ota-fleet serve`'s
server on 127.0.0.1, installs it onto a simulated device booted from v1 (both
slots hold v1), and prints the bytes downloaded next to the full bundle and our
delta bundle (`ota-bundle create --base`, built only with --delta: it takes
minutes; else the size given by --delta-size KIND=BYTES, e.g. from the
bench/delta.py table). Not a pass/fail test. Target (issue 9): downloaded <=
1.2x our delta. One row per full bundle: as before the block index (4 MiB
ops, `--no-block-index`), then one per `--chunk SIZE` asked for (the unit an
adaptive download fetches; each with the block index), with its size against
the first; with --adaptive-base, one built with `--adaptive-base v1`. A last
row installs the first --chunk's bundle onto a device whose target slot holds
the first half of v2 (an attempt cut halfway). With --embedded, one more full
bundle is built with `--delta-from v1` (an embedded delta, docs/adaptive.md;
default 4 MiB chunks): its size, and what a device holding v1 downloads; the
embedded delta's section (op table and payloads) is printed too, and stands in
for "our delta" when neither --delta nor --delta-size gives it (a standalone
delta bundle is that section plus a head of well under 1 KiB).

Usage: .venv/bin/python -m bench.adaptive [--corpus DIR] [--pair ext4|sqfs ...] [--delta]
       [--delta-size ext4=3826638 ...] [--chunk 4M --chunk 64K ...] [--adaptive-base] [--embedded]
       [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.install_vs_dd import scratch_dir
from bundler.fleet.serve import BundleServer

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
COMPATIBLE = "edge-ota-bench"
TARGET = 1.2


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True)


def install(device: Path, v1: Path, cut: tuple[Path, int] | None, keys: Path, url: str) -> tuple[int, float]:
    """Bytes downloaded (and seconds) installing `url` adaptively onto a device booted from v1,
    its target slot holding the first `cut[1]` bytes of `cut[0]` (an interrupted attempt)."""
    slot_size = -(-max(v1.stat().st_size, (cut[0] if cut else v1).stat().st_size) // MIB) * MIB
    run([tool("ota-agent"), "sim", "init", str(device), "--image", str(v1), "--keyring", str(keys / "signing.pub"),
         "--compatible", COMPATIBLE, "--slot-size", str(slot_size)])
    if cut is not None:
        with cut[0].open("rb") as src, (device / "slot-B.img").open("r+b") as dst:
            left = cut[1]
            while left:
                chunk = src.read(min(left, 4 * MIB))
                dst.write(chunk)
                left -= len(chunk)
    config = device / "agent.toml"
    config.write_text(config.read_text() + "\n[download]\nadaptive = true\n")
    t0 = time.perf_counter()
    run([tool("ota-agent"), "-c", str(config), "install", url])
    took = time.perf_counter() - t0
    last = json.loads(run([tool("ota-agent"), "-c", str(config), "status", "--json"]).stdout)["last_result"]
    assert last["result"] == "ok", last
    shutil.rmtree(device, ignore_errors=True)
    return int(last["downloaded"]), took


def run_pair(
    work: Path, kind: str, pair: tuple[Path, Path], keys: Path, *, delta_size: int | None, build_delta: bool,
    chunks: list[str], hint: bool, embedded: bool = False,
) -> None:
    v1, v2 = pair
    d = work / kind
    (d / "www").mkdir(parents=True)
    key = ["--key", str(keys / "signing.key"), "--version", "2.0", "--security-version", "1",
           "--compatible", COMPATIBLE]
    plain = d / "www" / "plain.otab"  # the bundle as it was before the block index: 4 MiB ops, no index
    run([tool("ota-bundle"), "create", "--image", str(v2), *key, "--no-block-index", "-o", str(plain)])
    if build_delta:
        delta = d / "delta.otab"
        run([tool("ota-bundle"), "create", "--image", str(v2), "--base", str(v1), *key, "-o", str(delta)])
        delta_size = delta.stat().st_size
    rows: list[tuple[str, int, int, float]] = []  # (bundle, its size, downloaded, install seconds)
    server = BundleServer(d / "www", quiet=True)
    server.start()
    try:
        downloaded, took = install(d / "device", v1, None, keys, f"{server.url}/plain.otab")
        rows.append(("4M ops, no block index (before)", plain.stat().st_size, downloaded, took))
        for chunk in chunks:
            full = d / "www" / f"full-{chunk}.otab"
            t0 = time.perf_counter()
            run([tool("ota-bundle"), "create", "--image", str(v2), *key, "--chunk", chunk, "-o", str(full)])
            built = time.perf_counter() - t0
            downloaded, took = install(d / "device", v1, None, keys, f"{server.url}/{full.name}")
            rows.append((f"--chunk {chunk} + block index (built in {built:.0f} s)", full.stat().st_size,
                         downloaded, took))
        if hint:
            cut = d / "www" / "full-hint.otab"
            t0 = time.perf_counter()
            run([tool("ota-bundle"), "create", "--image", str(v2), *key, "--adaptive-base", str(v1), "-o", str(cut)])
            built = time.perf_counter() - t0
            downloaded, took = install(d / "device", v1, None, keys, f"{server.url}/{cut.name}")
            rows.append((f"--adaptive-base v1 (4M chunks cut to v1) + block index (built in {built:.0f} s)",
                         cut.stat().st_size, downloaded, took))
        section = None
        if embedded:
            emb = d / "www" / "full-embedded.otab"
            t0 = time.perf_counter()
            run([tool("ota-bundle"), "create", "--image", str(v2), *key, "--delta-from", str(v1), "-o", str(emb)])
            built = time.perf_counter() - t0
            doc = json.loads(run([tool("ota-bundle"), "inspect", str(emb), "--json"]).stdout)
            ref = doc["embedded_deltas"][0]
            section = ref["op_table"]["count"] * 128 + ref["payload"]["length"]
            downloaded, took = install(d / "device", v1, None, keys, f"{server.url}/{emb.name}")
            rows.append((f"--delta-from v1 (embedded delta of {section:,} bytes) + block index "
                         f"(built in {built:.0f} s)", emb.stat().st_size, downloaded, took))
            if delta_size is None:
                delta_size = section
        half = v2.stat().st_size // 2
        interrupted, _ = install(d / "device-cut", v1, (v2, half), keys, f"{server.url}/full-{chunks[0]}.otab")
    finally:
        server.stop()
    before = rows[0][1]
    how = " (the embedded delta's section)" if section is not None and delta_size == section else ""
    print(f"\n[{kind}] {v1.name} -> {v2.name} ({v2.stat().st_size} bytes); our delta: "
          f"{delta_size or '-'} bytes{how}; target: downloaded <= {TARGET}x our delta")
    print("| full bundle | bundle bytes | size vs before | adaptive download, device holds v1 | vs bundle "
          "| vs our delta | install s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for what, size, n, took in rows:
        vs_delta = f"{n / delta_size:.2f}x" if delta_size and n is not None else "-"
        print(f"| {what} | {size:,} | {size / before - 1:+.1%} | {n:,} | {n / size:.3f}x | {vs_delta} | {took:.1f} |")
    print(f"| --chunk {chunks[0]}, target slot also holds the first half of v2 (an attempt cut halfway) | - | - "
          f"| {interrupted:,} | - | {f'{interrupted / delta_size:.2f}x' if delta_size else '-'} | - |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.adaptive", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path(os.environ.get("CORPUS", HERE / "corpus")))
    parser.add_argument("--pair", action="append", choices=("ext4", "sqfs"))
    parser.add_argument("--delta", action="store_true", help="build our delta bundle too (minutes)")
    parser.add_argument("--delta-size", action="append", default=[], metavar="KIND=BYTES")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--adaptive-base", action="store_true",
                        help="also build the bundle with --adaptive-base v1 (chunks cut to the base)")
    parser.add_argument("--embedded", action="store_true",
                        help="also build the full bundle with --delta-from v1 (an embedded delta; minutes)")
    parser.add_argument("--chunk", action="append", metavar="SIZE",
                        help="build the full bundle with this --chunk (repeatable; default 4M)")
    args = parser.parse_args(argv)
    sizes = {k: int(v) for k, _, v in (s.partition("=") for s in args.delta_size)}
    images = args.corpus / "images"
    if not images.is_dir():
        print(f"no corpus at {args.corpus} (bench/delta_corpus/make-corpus.sh builds one)", file=sys.stderr)
        return 2
    work = scratch_dir(args.workdir, "adaptive-bench-")
    try:
        keys = work / "keys"
        run([tool("ota-bundle"), "keygen", str(keys)])
        for kind in args.pair or ["ext4", "sqfs"]:
            pair = (images / f"v1.{kind}", images / f"v2.{kind}")
            run_pair(work, kind, pair, keys, delta_size=sizes.get(kind), build_delta=args.delta,
                     chunks=args.chunk or ["4M"], hint=args.adaptive_base, embedded=args.embedded)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
