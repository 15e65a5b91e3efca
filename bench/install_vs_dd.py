"""Full-bundle install against a raw `dd` copy, on the same disk.

Owns the foundation benchmark: it makes a test image (a real ext4 filesystem
filled from this machine's /usr/lib and /usr/share, or a seeded synthetic mix
of text-like, binary-like, random and zero extents), builds a full bundle with
`ota-bundle create`, creates a simulated device with `ota-agent sim init`, then
times `ota-agent install` (verify + write + fsync + read-back) and
`dd bs=4M conv=fsync` onto the same slot file, and prints a table with median
times, throughput and peak RSS, for a small and a large image.

Peak RSS is `getrusage(RUSAGE_CHILDREN).ru_maxrss` seen by a dedicated small
helper process that forks and execs the measured command, so neither this
script's memory nor another step's leaks into the number. Linux carries the
forking process's resident size into the child across exec, so every value
has a floor (the helper's own size); the output states it.

It is not a pass/fail test and does not change agent/ or bundler/: it prints
the targets (install <= 2x dd, peak RSS < 64 MiB) next to the numbers, and
with --profile runs one more install under cProfile and prints where the time goes.

Usage: .venv/bin/python bench/install_vs_dd.py [--size MiB] [--small-size MiB] [--runs N]
       [--image ext4|synthetic] [--seed N] [--workdir DIR] [--keep] [--profile]
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import pstats
import random
import shlex
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
BLOCK = 4096
TARGET_RATIO = 2.0
TARGET_RSS_MIB = 64.0
COMPATIBLE = "edge-ota-bench"
FS_UUID = "6b5c0f2e-0c1d-4b7a-9c3e-0123456789ab"
HASH_SEED = "3c5e7a9b-1d2f-4e6a-8b0c-fedcba987654"
FAKE_TIME = "1700000000"
FILL = 0.6  # share of an ext4 image filled with file data; the rest is free space (zeros)
TREES = (Path("/usr/lib"), Path("/usr/share"))

# Runs in a fresh, small interpreter: fork, exec the command with its output to
# a log file, wait, then report wall time and RUSAGE_CHILDREN's peak RSS.
_HELPER = r"""
import os, resource, sys, time
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
argv = sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status = os.waitpid(pid, 0)
seconds = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(seconds, os.waitstatus_to_exitcode(status), usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
"""

_PROFILE = r"""
import cProfile, sys
from agent.cli import main
out = sys.argv.pop(1)
cProfile.run("rc = main(sys.argv[1:])", out)
"""


@dataclass(frozen=True, slots=True)
class Sample:
    seconds: float
    rss_mib: float
    cpu_s: float = 0.0  # user + system time of the command and its threads (and children)


@dataclass(slots=True)
class Row:
    step: str
    size_mib: int
    samples: list[Sample] = field(default_factory=list)
    moves_image: bool = True  # False: throughput is meaningless (start-up only)

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def rss_mib(self) -> float:
        return max(s.rss_mib for s in self.samples)


def scratch_dir(parent: str | Path | None, prefix: str) -> Path:
    """A new scratch directory inside `parent` (made first when it does not exist yet;
    None: the system's temporary directory)."""
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


PACKAGES = ("agent", "bundler", "hw", "ota_common")


def compile_bytecode(tree: Path) -> None:
    """Compile the project's modules under `tree` into their __pycache__, as the
    .deb's postinst does on a device: without it an environment with
    PYTHONDONTWRITEBYTECODE=1 compiles every module from source at each start
    (`ota-agent status`: 0.46-0.52 s instead of 0.28-0.31 s on this project's machine)."""
    for package in PACKAGES:
        if (tree / package).is_dir():
            compileall.compile_dir(tree / package, quiet=1)


class Bench:
    def __init__(self, work: Path, bindir: Path) -> None:
        self.work = work
        self.bindir = bindir
        self.log = work / "commands.log"
        compile_bytecode(Path(__file__).resolve().parent.parent)
        self.can_drop = drop_caches()

    def measure(self, argv: Sequence[str], *, cold: bool = True) -> Sample:
        if cold:
            drop_caches()
        with self.log.open("a") as f:
            f.write(f"\n$ {' '.join(argv)}\n")
        helper = [sys.executable, "-I", "-S", "-c", _HELPER, str(self.log), *argv]
        out = subprocess.run(helper, check=True, capture_output=True, text=True).stdout.split()
        seconds, rc, rss_kib, cpu = float(out[0]), int(out[1]), int(out[2]), float(out[3])
        if rc != 0:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"command failed (exit {rc}): {' '.join(argv)}\n--- {self.log} (tail) ---\n{tail}")
        return Sample(seconds, rss_kib / 1024, cpu)

    def tool(self, name: str) -> str:
        path = self.bindir / name
        return str(path) if path.exists() else (shutil.which(name) or name)


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# ---- images -----------------------------------------------------------------


def stage_tree(dest: Path, budget: int, max_entries: int) -> tuple[int, int]:
    """Hard-link (or copy) files from TREES into dest in sorted order until
    `budget` bytes of file data or `max_entries` inodes; returns (bytes, entries)."""
    used = entries = 0
    for root in TREES:
        share = budget // len(TREES)
        limit = used + share
        stamps: list[tuple[Path, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            src_dir = Path(dirpath)
            dst_dir = dest / src_dir.relative_to("/")
            dst_dir.mkdir(parents=True, exist_ok=True)
            stamps.append((dst_dir, src_dir.stat()))
            for name in [*sorted(filenames), *[d for d in dirnames if (src_dir / d).is_symlink()]]:
                if used >= limit - BLOCK or entries >= max_entries:
                    break
                src, dst = src_dir / name, dst_dir / name
                st = src.lstat()
                if src.is_symlink():
                    os.symlink(os.readlink(src), dst)
                    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
                elif src.is_file():
                    cost = -(-st.st_size // BLOCK) * BLOCK
                    if used + cost > limit:
                        continue
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
                    used += cost
                else:
                    continue
                entries += 1
            entries += 1
            if used >= limit - BLOCK or entries >= max_entries:
                break
        for d, st in reversed(stamps):
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    return used, entries


def make_ext4(path: Path, size: int, staging: Path) -> str:
    budget = int(size * FILL)
    max_inodes = size // 16384
    used, entries = stage_tree(staging, budget, int(max_inodes * 0.8))
    sparse = path.with_suffix(".sparse")
    with sparse.open("wb") as f:
        f.truncate(size)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": FAKE_TIME}
    mkfs = ["mkfs.ext4", "-q", "-F", "-T", "default", "-b", str(BLOCK), "-i", "16384", "-L", "rootfs"]
    mkfs += ["-U", FS_UUID, "-E", f"root_owner=0:0,hash_seed={HASH_SEED}", "-d", str(staging), str(sparse)]
    r = subprocess.run(mkfs, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"mkfs.ext4 failed: {r.stderr.strip()}")
    densify(sparse, path)
    sparse.unlink()
    shutil.rmtree(staging)
    return f"ext4 (mkfs.ext4 -d, {used / MIB:.0f} MiB in {entries} inodes from {', '.join(map(str, TREES))})"


def densify(src: Path, dst: Path) -> None:
    """Copy with every block written, so the image reads from disk like a downloaded file."""
    with src.open("rb") as i, dst.open("wb") as o:
        while chunk := i.read(MIB):
            o.write(chunk)
        o.flush()
        os.fsync(o.fileno())


def synthetic_extents(size: int, seed: int) -> Iterator[bytes]:
    """A seeded mix like a root filesystem: text-like (config, scripts, docs),
    binary-like (code: skewed byte distribution), random (already-compressed
    files) and zero runs (free space), in 4 KiB-aligned extents up to 8 MiB."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 12))) for _ in range(5000)]
    text = "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(70_000)).encode()
    alphabet = list(range(256))
    weights = [64 if b == 0 else 8 if b < 16 or b == 0xFF else 1 for b in alphabet]
    binary = bytes(rng.choices(alphabet, weights=weights, k=4 * MIB))
    kinds = ("text", "binary", "random", "zero")
    done = 0
    while done < size:
        kind = rng.choices(kinds, weights=(25, 25, 15, 35))[0]
        length = min(rng.randint(1, 2048) * BLOCK, size - done)
        if kind == "zero":
            yield bytes(length)
        elif kind == "random":
            yield rng.randbytes(length)
        else:
            pool = text if kind == "text" else binary
            start = rng.randrange(len(pool))
            piece = (pool[start:] + pool) * (1 + length // len(pool))
            yield piece[:length]
        done += length


def make_synthetic(path: Path, size: int, seed: int) -> str:
    with path.open("wb") as f:
        for extent in synthetic_extents(size, seed):
            f.write(extent)
        os.fsync(f.fileno())
    return f"synthetic (seed {seed}: text-like, binary-like, random and zero extents)"


def zero_share(path: Path) -> float:
    zero = bytes(MIB)
    total = zeros = 0
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            total += 1
            zeros += chunk == zero[: len(chunk)]
    return zeros / max(total, 1)


# ---- the benchmark ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    size_mib: int
    image: Path
    bundle: Path
    device: Path
    description: str
    zero_share: float
    bundle_bytes: int


def prepare(bench: Bench, size_mib: int, rows: list[Row], *, kind: str, seed: int, keys: Path) -> Prepared:
    d = bench.work / f"{size_mib}M"
    d.mkdir()
    image = d / "image.img"
    size = size_mib * MIB
    t0 = time.perf_counter()
    description = make_ext4(image, size, d / "staging") if kind == "ext4" else make_synthetic(image, size, seed)
    print(f"[{size_mib} MiB] image ready in {time.perf_counter() - t0:.1f} s: {description}", flush=True)
    bundle = d / "bundle.otab"
    create = [bench.tool("ota-bundle"), "create", "--image", str(image), "--key", str(keys / "signing.key")]
    create += ["--version", "2.0", "--security-version", "1", "--compatible", COMPATIBLE, "-o", str(bundle)]
    rows.append(Row("bundle create", size_mib, [bench.measure(create)]))
    device = d / "device"
    init = [bench.tool("ota-agent"), "sim", "init", str(device), "--image", str(image)]
    init += ["--keyring", str(keys / "signing.pub"), "--compatible", COMPATIBLE, "--slot-size", str(size)]
    bench.measure(init, cold=False)
    return Prepared(size_mib, image, bundle, device, description, zero_share(image), bundle.stat().st_size)


def run_size(bench: Bench, p: Prepared, runs: int, rows: list[Row]) -> None:
    slot = p.device / "slot-B.img"  # the inactive slot: the installer's target, and dd's
    install = [bench.tool("ota-agent"), "-c", str(p.device / "agent.toml"), "install", str(p.bundle)]
    dd = ["dd", f"if={p.image}", f"of={slot}", "bs=4M", "conv=fsync,notrunc", "status=none"]
    readback = f"dd if={shlex.quote(str(slot))} bs=4M iflag=direct status=none | {digest_tool()}"
    dd_rb = ["sh", "-c", f"{shlex.join(dd)} && {readback}"]
    status = [bench.tool("ota-agent"), "-c", str(p.device / "agent.toml"), "status"]
    r_start = Row(
        "ota-agent status (start-up)", p.size_mib, [bench.measure(status) for _ in range(runs)], moves_image=False
    )
    r_install, r_dd, r_ddrb = (
        Row("ota-agent install", p.size_mib),
        Row("dd", p.size_mib),
        Row("dd + read-back", p.size_mib),
    )
    for i in range(runs):
        for row, argv in ((r_install, install), (r_dd, dd), (r_ddrb, dd_rb)):
            row.samples.append(bench.measure(argv))
        print(
            f"[{p.size_mib} MiB] run {i + 1}/{runs}: install {r_install.samples[-1].seconds:.2f} s, "
            f"dd {r_dd.samples[-1].seconds:.2f} s, dd + read-back {r_ddrb.samples[-1].seconds:.2f} s",
            flush=True,
        )
    rows += [r_start, r_install, r_dd, r_ddrb]


def digest_tool() -> str:
    """coreutils sha256sum is several times slower than OpenSSL's SHA-256, which hashlib uses: prefer openssl."""
    return "openssl dgst -sha256" if shutil.which("openssl") else "sha256sum"


def profile_install(bench: Bench, p: Prepared) -> None:
    out = bench.work / "install.prof"
    argv = [sys.executable, "-c", _PROFILE, str(out), "-c", str(p.device / "agent.toml"), "install", str(p.bundle)]
    sample = bench.measure(argv)
    print(f"\ncProfile of one install of the {p.size_mib} MiB bundle ({sample.seconds:.2f} s under the profiler)")
    stats = pstats.Stats(str(out), stream=sys.stdout)
    stats.strip_dirs()
    print("project functions by cumulative time:")
    stats.sort_stats("cumulative").print_stats(r"^(cli|installer|slot|ops|reader|sources)\.py", 14)
    print("all functions by own time:")
    stats.sort_stats("tottime").print_stats(10)


def print_table(rows: list[Row]) -> None:
    header = ("step", "image MiB", "runs", "time (s)", "MiB/s", "peak RSS (MiB)")
    lines = [
        (
            r.step,
            str(r.size_mib),
            str(len(r.samples)),
            f"{r.seconds:.2f}"
            + (
                f" ({min(s.seconds for s in r.samples):.2f}-{max(s.seconds for s in r.samples):.2f})"
                if len(r.samples) > 1
                else ""
            ),
            f"{r.size_mib / r.seconds:.0f}" if r.moves_image else "-",
            f"{r.rss_mib:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", type=int, default=1024, help="image size in MiB (default 1024)")
    ap.add_argument("--small-size", type=int, default=256, help="smaller image for the RSS comparison (0: none)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of install and dd per size (default 3)")
    ap.add_argument(
        "--image",
        choices=("auto", "ext4", "synthetic"),
        default="auto",
        help="auto: ext4 when mkfs.ext4 is installed, else synthetic",
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the synthetic image")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="parent of the scratch directory (default /var/tmp); the scratch directory is removed",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--profile", action="store_true", help="also profile one install of the largest image")
    args = ap.parse_args(argv)
    kind = args.image
    if kind == "auto":
        kind = "ext4" if shutil.which("mkfs.ext4") else "synthetic"
    sizes = sorted({s for s in (args.small_size, args.size) if s > 0})
    work = scratch_dir(args.workdir, "edge-ota-bench-")
    bench = Bench(work, Path(sys.executable).parent)
    try:
        return run(bench, args, kind, sizes)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(bench: Bench, args: argparse.Namespace, kind: str, sizes: list[int]) -> int:
    keys = bench.work / "keys"
    subprocess.run([bench.tool("ota-bundle"), "keygen", str(keys)], check=True, capture_output=True)
    floor = bench.measure(["true"], cold=False).rss_mib
    rows: list[Row] = []
    prepared: list[Prepared] = []
    for size_mib in sizes:
        p = prepare(bench, size_mib, rows, kind=kind, seed=args.seed, keys=keys)
        prepared.append(p)
        run_size(bench, p, args.runs, rows)
    fs = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(bench.work)], capture_output=True, text=True, check=False
    )
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}; disk: {bench.work} ({' on '.join(fs.stdout.split()) or '?'})"
    )
    print(
        f"page cache dropped before each timed step: {'yes' if bench.can_drop else 'no (needs root)'}; "
        f"RSS floor of the measuring helper: {floor:.1f} MiB"
    )
    for p in prepared:
        print(
            f"image {p.size_mib} MiB: {p.description}; {p.zero_share * 100:.0f}% all-zero MiB; "
            f"bundle {p.bundle_bytes / MIB:.1f} MiB ({p.bundle_bytes / (p.size_mib * MIB) * 100:.1f}% of the image)"
        )
    print(
        "dd = dd bs=4M conv=fsync,notrunc onto the inactive slot file; dd + read-back adds an O_DIRECT read of the "
        f"slot piped to {digest_tool()} (what the installer's read-back does)\n"
    )
    print_table(rows)
    print()
    by = {(r.step, r.size_mib): r for r in rows}
    ok = True
    for p in prepared:
        inst, dd, ddrb = (by[(s, p.size_mib)] for s in ("ota-agent install", "dd", "dd + read-back"))
        ratio = inst.seconds / dd.seconds
        work = inst.seconds - by[("ota-agent status (start-up)", p.size_mib)].seconds
        ok &= ratio <= TARGET_RATIO and inst.rss_mib < TARGET_RSS_MIB
        print(
            f"{p.size_mib} MiB: install/dd = {ratio:.2f} (target <= {TARGET_RATIO:.0f}); "
            f"without the agent's start-up {work / dd.seconds:.2f}; "
            f"install/(dd + read-back) = {inst.seconds / ddrb.seconds:.2f}; "
            f"install peak RSS {inst.rss_mib:.1f} MiB (target < {TARGET_RSS_MIB:.0f})"
        )
    print("all targets met" if ok else "target missed: rerun with --profile to see where the time goes")
    if args.profile:
        profile_install(bench, prepared[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
