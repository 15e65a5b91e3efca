"""USB stick install against a local-file install of the same bundle.

Makes a random image (incompressible: the worst case for the stick's read
rate), builds a full bundle, puts it with N-1 bundles for another compatible
string on an ext4 stick image attached as a loop device, and times on fresh
simulated devices:
  - `ota-agent media /dev/loopN`: probe, mount, scan, read and verify every
    candidate's head, install, write the receipt back, unmount;
  - `ota-agent install FILE` of the same bundle from the local disk;
  - `dd` of the bundle from the mounted stick to /dev/null (the read alone).
Prints median times per step. Needs root (loop devices, mount). Not a test.

Usage: .venv/bin/python bench/media_install.py [--size MiB] [--bundles N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def timed(*argv: str | Path) -> float:
    start = time.perf_counter()
    run(*argv)
    return time.perf_counter() - start


def device(work: Path, name: str, image: Path, keys: Path) -> Path:
    d = work / name
    run(BIN / "ota-agent", "sim", "init", d, "--image", image, "--keyring", keys / "signing.pub",
        "--compatible", "bench-board")
    return d / "agent.toml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="image size in MiB (default 64)")
    p.add_argument("--bundles", type=int, default=8, help="bundles on the stick (default 8)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices, mount)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        work = Path(tmp)
        factory, image = work / "factory.img", work / "v2.img"
        factory.write_bytes(os.urandom(1 << 20))
        image.write_bytes(os.urandom(args.size << 20))
        run(BIN / "ota-bundle", "keygen", work / "keys")
        stick = work / "stick" / "edge-ota"
        stick.mkdir(parents=True)
        bundle = stick / "v2.otab"
        run(BIN / "ota-bundle", "create", "--image", image, "--key", work / "keys/signing.key", "--version", "2.0",
            "--security-version", "1", "--compatible", "bench-board", "--level", "1", "-o", bundle)
        small = work / "small.img"
        small.write_bytes(os.urandom(1 << 20))
        for i in range(args.bundles - 1):
            run(BIN / "ota-bundle", "create", "--image", small, "--key", work / "keys/signing.key", "--version",
                f"9.{i}", "--security-version", "1", "--compatible", "other-board", "-o", stick / f"other-{i}.otab")
        img = work / "stick.img"
        run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", work / "stick", img, f"{args.size + 64}M")
        dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                             text=True).stdout.strip()
        mnt = work / "mnt"
        mnt.mkdir()
        rows: dict[str, list[float]] = {"media (stick)": [], "install (local file)": [], "dd from stick": []}
        try:
            for i in range(args.runs):
                shutil.copyfile(bundle, work / "local.otab")
                run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
                rows["media (stick)"].append(
                    timed(BIN / "ota-agent", "-c", device(work, f"m{i}", factory, work / "keys"), "media", dev))
                run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
                rows["install (local file)"].append(
                    timed(BIN / "ota-agent", "-c", device(work, f"i{i}", factory, work / "keys"), "install",
                          work / "local.otab"))
                run("mount", "-o", "ro", dev, mnt)
                try:
                    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
                    rows["dd from stick"].append(
                        timed("dd", f"if={mnt}/edge-ota/v2.otab", "of=/dev/null", "bs=4M"))
                finally:
                    run("umount", mnt)
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)
    print(f"image {args.size} MiB random, bundle ~{args.size} MiB, {args.bundles} bundles on the stick, "
          f"median of {args.runs} runs (loop device over a file: a real stick reads at 20-200 MB/s)")
    print(f"{'step':<24}{'seconds':>10}{'MiB/s':>10}")
    for name, values in rows.items():
        t = statistics.median(values)
        print(f"{name:<24}{t:>10.2f}{args.size / t:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
