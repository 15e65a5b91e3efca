"""Delta bundles against the tools a user would pick instead, on real Debian images.

Owns the delta benchmark: for each image pair of the corpus (a Debian bookworm
device rootfs before and after a security update, as ext4 and as squashfs;
bench/delta_corpus/make-corpus.sh builds it when absent) it measures in one
run, side by side:
- our delta bundle (`ota-bundle create --base`): size, build time, and
  `ota-agent install` onto a simulated device booted from the base: apply time
  and apply peak RSS; next to it `dd conv=fsync` of the new image onto the same slot;
- `zstd -19 --long=31 --patch-from`, `xdelta3 -9 -S djw` with a source window
  covering the base, `bsdiff` (skipped with a note past a time cap), casync
  (the new chunk bytes a device holding the base downloads; its extract with
  the base as seed): size, build time, apply time and peak RSS;
- our full bundle and `zstd -19` of the new image, for scale.

Missing peer tools are installed with apt when running as root. Times are wall
clock with a cold page cache (root), peak RSS via a fresh helper process
(bench/install_vs_dd.py, `Bench.measure`). Not a pass/fail test: it prints the
targets next to the numbers.

Usage: .venv/bin/python -m bench.delta [--corpus DIR] [--pair ext4|sqfs ...] [--workdir DIR]
       [--bsdiff-cap SECONDS] [--keep]
Corpus: --corpus, else $CORPUS, else bench/corpus.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.install_vs_dd import Bench, Sample, scratch_dir
from bundler.format.deflate import RECOMPRESSED, Codec
from bundler.format.header import OP_RECORD_SIZE
from bundler.format.ops import DELTA_EXTENT_SIZE, PIECE_SIZE, OpType, parse_delta
from bundler.format.reader import BundleReader
from bundler.format.signing import Keyring, verify

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
COMPATIBLE = "edge-ota-bench"
PEER_PACKAGES = {"zstd": "zstd", "xdelta3": "xdelta3", "bsdiff": "bsdiff", "casync": "casync"}
TARGETS = {"ext4": 0.7, "sqfs": 0.35}
BUILD_TARGET = 3.0  # x xdelta3's build time
APPLY_TARGET = 2.0  # x dd conv=fsync
RSS_TARGET_MIB = 64.0


@dataclass(slots=True)
class Result:
    tool: str
    size: int | None  # bytes to download; None: not measured
    build: Sample | None = None
    apply: Sample | None = None
    peer: bool = True  # counts for "smallest peer"
    note: str = ""


def ensure_tools() -> dict[str, bool]:
    have = {tool: shutil.which(tool) is not None for tool in PEER_PACKAGES}
    missing = [PEER_PACKAGES[t] for t, ok in have.items() if not ok]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"apt: installing {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False, capture_output=True)
        have = {tool: shutil.which(tool) is not None for tool in PEER_PACKAGES}
    return have


def ensure_corpus(corpus: Path) -> None:
    images = corpus / "images"
    if all((images / f"{v}.{k}").exists() for v in ("v1", "v2") for k in ("ext4", "sqfs")):
        return
    print(f"building the corpus in {corpus} (debootstrap; takes a while)", flush=True)
    subprocess.run([str(HERE / "delta_corpus" / "make-corpus.sh"), str(corpus)], check=True)


def try_measure(bench: Bench, argv: list[str], cap: float | None = None) -> Sample | None:
    """A measured run, or None when it failed (or ran past `cap` seconds)."""
    if cap is not None:
        argv = ["timeout", str(int(cap)), *argv]
    try:
        return bench.measure(argv)
    except SystemExit:
        return None


def where_the_bytes_go(bundle: Path, keyring: Path) -> str:
    """Our delta's bytes by what they carry: payload per op type, op records, DELTA
    extent and piece records, and how much of the DELTA ops' output is carried as
    uncompressed stream content (deflate-aware) rather than raw bytes."""
    payload = dict.fromkeys(OpType, 0)
    count = dict.fromkeys(OpType, 0)
    extents = pieces = streamed = gnu = filtered = raw = 0
    with bundle.open("rb") as f:
        reader = BundleReader(f)
        verified = verify(reader.read_head(), Keyring.load(keyring))
        ops = reader.read_op_table(verified)
        base_size = verified.manifest.images[0].base_size or 0
        for index, op, data in reader.iter_payload(ops):
            count[op.type] += 1
            payload[op.type] += op.payload_length
            if op.type is OpType.DELTA and data is not None:
                delta = parse_delta(op, data, index, base_size)
                extents += len(delta.extents)
                pieces += len(delta.pieces)
                streamed += sum(p.out_length for p in delta.pieces if p.codec in RECOMPRESSED)
                gnu += sum(p.out_length for p in delta.pieces if p.codec is Codec.DEFLATE_BLOCKS)
                filtered += sum(p.out_length for p in delta.pieces if p.codec is Codec.X86)
                raw += op.dst_length - sum(p.out_length for p in delta.pieces if p.codec is not Codec.RAW)
    parts = [f"{t.name} {count[t]} ops {payload[t]:,} B" for t in OpType if count[t]]
    parts.append(f"op records {len(ops) * OP_RECORD_SIZE:,} B")
    parts.append(f"DELTA extent records {extents} x {DELTA_EXTENT_SIZE} = {extents * DELTA_EXTENT_SIZE:,} B")
    parts.append(f"piece records {pieces * PIECE_SIZE:,} B")
    parts.append(f"DELTA output: {streamed:,} B as stream content (of which {gnu:,} B GNU gzip members, "
                 f"DEFLATE_BLOCKS), {filtered:,} B x86-filtered, {raw:,} B as raw bytes")
    return "; ".join(parts)


def casync_new_bytes(old_store: Path, new_store: Path) -> int:
    old = {p.name for p in old_store.rglob("*.cacnk")}
    return sum(p.stat().st_size for p in new_store.rglob("*.cacnk") if p.name not in old)


def run_pair(
    bench: Bench, kind: str, pair: tuple[Path, Path], keys: Path, have: dict[str, bool], *, cap: float
) -> None:
    v1, v2 = pair
    d = bench.work / kind
    d.mkdir()
    size = v2.stat().st_size
    results: list[Result] = []
    key = ["--key", str(keys / "signing.key"), "--version", "2.0", "--security-version", "1"]
    key += ["--compatible", COMPATIBLE]

    # ours: delta, installed on a simulated device booted from v1; dd onto the same slot
    delta = d / "delta.otab"
    build = bench.measure([bench.tool("ota-bundle"), "create", "--image", str(v2), "--base", str(v1), *key,
                           "-o", str(delta)])
    device = d / "device"
    slot_size = -(-max(size, v1.stat().st_size) // MIB) * MIB
    subprocess.run([bench.tool("ota-agent"), "sim", "init", str(device), "--image", str(v1), "--keyring",
                    str(keys / "signing.pub"), "--compatible", COMPATIBLE, "--slot-size", str(slot_size)],
                   check=True, capture_output=True)
    apply = bench.measure([bench.tool("ota-agent"), "-c", str(device / "agent.toml"), "install", str(delta)])
    results.append(Result("edge-ota delta bundle", delta.stat().st_size, build, apply, peer=False))
    dd = bench.measure(["dd", f"if={v2}", f"of={device / 'slot-B.img'}", "bs=4M", "conv=fsync,notrunc",
                        "status=none"])
    print(f"[{kind}] ours: {delta.stat().st_size} bytes, build {build.seconds:.1f} s, apply {apply.seconds:.1f} s",
          flush=True)
    print(f"[{kind}] where the bytes go: {where_the_bytes_go(delta, keys / 'signing.pub')}", flush=True)

    out = d / "out.img"
    if have["zstd"]:
        pf = d / "patch.zst"
        b = bench.measure(["zstd", "-q", "-f", "-19", "--long=31", f"--patch-from={v1}", str(v2), "-o", str(pf)])
        a = bench.measure(["zstd", "-q", "-f", "-d", "--long=31", f"--patch-from={v1}", str(pf), "-o", str(out)])
        results.append(Result("zstd -19 --long=31 --patch-from", pf.stat().st_size, b, a))
    else:
        results.append(Result("zstd --patch-from", None, note="zstd not installed"))
    if have["xdelta3"]:
        window = str(1 << max(20, (v1.stat().st_size - 1).bit_length()))
        xd = d / "patch.vcdiff"
        b = bench.measure(["xdelta3", "-9", "-S", "djw", "-B", window, "-e", "-f", "-s", str(v1), str(v2), str(xd)])
        a = bench.measure(["xdelta3", "-d", "-B", window, "-f", "-s", str(v1), str(xd), str(out)])
        results.append(Result("xdelta3 -9 -S djw", xd.stat().st_size, b, a))
    else:
        results.append(Result("xdelta3", None, note="xdelta3 not installed"))
    if have["bsdiff"]:
        bs = d / "patch.bsdiff"
        made = try_measure(bench, ["bsdiff", str(v1), str(v2), str(bs)], cap)
        if made is None:
            results.append(Result("bsdiff", None, note=f"skipped: not done within {cap:.0f} s"))
        else:
            a = bench.measure(["bspatch", str(v1), str(out), str(bs)])
            results.append(Result("bsdiff", bs.stat().st_size, made, a))
    else:
        results.append(Result("bsdiff", None, note="bsdiff not installed"))
    if have["casync"]:
        s1, s2 = d / "store-v1", d / "store-v2"
        bench.measure(["casync", "make", f"--store={s1}", str(d / "v1.caibx"), str(v1)])
        b = bench.measure(["casync", "make", f"--store={s2}", str(d / "v2.caibx"), str(v2)])
        out.unlink(missing_ok=True)  # casync extract refuses an existing file ("Stale file handle")
        got = try_measure(bench, ["casync", "extract", f"--store={s2}", f"--seed={v1}", str(d / "v2.caibx"), str(out)])
        new = casync_new_bytes(s1, s2) + (d / "v2.caibx").stat().st_size
        results.append(Result("casync (new chunks + index)", new, b, got, note="" if got else "extract failed"))
    else:
        results.append(Result("casync", None, note="casync not installed (apt-get install casync)"))

    full = d / "full.otab"
    b = bench.measure([bench.tool("ota-bundle"), "create", "--image", str(v2), *key, "-o", str(full)])
    results.append(Result("edge-ota full bundle", full.stat().st_size, b, peer=False))
    if have["zstd"]:
        z = d / "image.zst"
        b = bench.measure(["zstd", "-q", "-f", "-19", "-T0", str(v2), "-o", str(z)])
        results.append(Result("zstd -19 -T0 of the image", z.stat().st_size, b, peer=False))
    out.unlink(missing_ok=True)
    print_table(kind, v1, v2, results, dd)


def print_table(kind: str, v1: Path, v2: Path, results: list[Result], dd: Sample) -> None:
    peers = [r for r in results if r.peer and r.size is not None]
    smallest = min(peers, key=lambda r: r.size or 0) if peers else None
    print(f"\n### {kind}: {v1.name} ({v1.stat().st_size:,} B) -> {v2.name} ({v2.stat().st_size:,} B)\n")
    print("| tool | bytes | vs smallest peer | build s | apply s | apply peak RSS MiB | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        ratio = f"{r.size / smallest.size:.2f}x" if r.size and smallest and smallest.size else ""
        size = f"{r.size:,}" if r.size is not None else "—"
        build = f"{r.build.seconds:.1f}" if r.build else ""
        apply = f"{r.apply.seconds:.1f}" if r.apply else ""
        rss = f"{r.apply.rss_mib:.1f}" if r.apply else ""
        print(f"| {r.tool} | {size} | {ratio} | {build} | {apply} | {rss} | {r.note} |")
    print(f"| dd bs=4M conv=fsync (the new image onto the slot) | | | | {dd.seconds:.1f} | {dd.rss_mib:.1f} | |")
    ours = results[0]
    xdelta = next((r for r in results if r.tool.startswith("xdelta3") and r.build), None)
    lines = []
    if smallest and smallest.size and ours.size:
        lines.append(f"size {ours.size / smallest.size:.2f}x the smallest peer ({smallest.tool}); "
                     f"target <= {TARGETS.get(kind, 1.0)}x")
    if xdelta and xdelta.build and ours.build:
        lines.append(f"build {ours.build.seconds / xdelta.build.seconds:.2f}x xdelta3's; target <= {BUILD_TARGET}x")
    if ours.apply:
        lines.append(f"apply {ours.apply.seconds / dd.seconds:.2f}x dd conv=fsync; target <= {APPLY_TARGET}x; "
                     f"peak RSS {ours.apply.rss_mib:.1f} MiB, target < {RSS_TARGET_MIB:.0f}")
    print("\n" + "\n".join(f"- {line}" for line in lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.delta", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path(os.environ.get("CORPUS", HERE / "corpus")))
    parser.add_argument("--pair", action="append", choices=("ext4", "sqfs"))
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--bsdiff-cap", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    ensure_corpus(args.corpus)
    have = ensure_tools()
    work = scratch_dir(args.workdir, "delta-bench-")
    bench = Bench(work, Path(sys.executable).parent)
    t0 = time.perf_counter()
    try:
        keys = work / "keys"
        subprocess.run([bench.tool("ota-bundle"), "keygen", str(keys)], check=True, capture_output=True)
        print(f"cpus {os.cpu_count()}, cold cache {'yes' if bench.can_drop else 'no (not root)'}, work {work}")
        for kind in args.pair or ["ext4", "sqfs"]:
            images = args.corpus / "images"
            pair = (images / f"v1.{kind}", images / f"v2.{kind}")
            run_pair(bench, kind, pair, keys, have, cap=args.bsdiff_cap)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
