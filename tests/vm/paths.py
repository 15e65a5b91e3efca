"""Where the virtual device's build inputs and cached outputs live: the cache
directory (outside the checkout, `EDGE_OTA_VM_CACHE`, default
/var/cache/edge-ota-vm), the packaging and image scripts, and the two steps
every user of a Debian root filesystem shares: the cached base tarball
(tests/vm/mkbase.sh) and the edge-ota .deb (packaging/build-deb.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
HERE = TOP / "tests" / "vm"
BUILD_DEB = TOP / "packaging" / "build-deb.sh"
MKBASE = HERE / "mkbase.sh"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_OTA_VM_CACHE", "/var/cache/edge-ota-vm"))


def base_tarball() -> Path:
    """The debootstrap'd bookworm base (minutes the first time, then cached)."""
    out = subprocess.run(["sh", str(MKBASE), str(cache_dir())], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def build_deb(outdir: Path) -> Path:
    """The edge-ota .deb of this checkout, built into `outdir` (a failure carries the script's own words)."""
    out = subprocess.run(["sh", str(BUILD_DEB), str(outdir)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"packaging/build-deb.sh exited {out.returncode}:\n{out.stderr[-3000:]}{out.stdout[-1000:]}")
    return Path(out.stdout.strip().splitlines()[-1])
