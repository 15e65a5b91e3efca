"""Where the virtual device's build inputs and cached outputs live: the cache
directory (outside the checkout, `EDGE_OTA_VM_CACHE`, default
/var/cache/edge-ota-vm), the packaging and image scripts, and the two steps
every user of a Debian root filesystem shares: the cached base tarball
(tests/vm/mkbase.sh) and the edge-ota .deb (packaging/build-deb.sh).

Builds from the checkout (pip writes its build tree there) and into the cache
are serialised host-wide by `exclusive`: the suite runs on several worker
processes, and a second builder must wait for the first and then find its
result, not race it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
HERE = TOP / "tests" / "vm"
BUILD_DEB = TOP / "packaging" / "build-deb.sh"
MKBASE = HERE / "mkbase.sh"


CHECKOUT = "checkout-build"  # pip builds a wheel in the checkout (the .deb, make install)
BASE = "vm-base"  # the cached debootstrap tarball
IMAGE = "vm-image"  # the cached VM image and the bundles cached beside it
KVM_PROBE = "vm-kvm-probe"  # the once-per-kernel probe of whether KVM guests run


def lock_file(resource: str) -> Path:
    """The file `exclusive` locks for `resource`."""
    return Path(tempfile.gettempdir()) / f"edge-ota-{resource}.lock"


@contextmanager
def exclusive(resource: str) -> Iterator[None]:
    """Hold the host-wide lock on `resource` (one of the names above) for the block.
    An flock on a file in the temporary directory: the kernel drops it when the
    holder dies, so a killed build never leaves it taken. Not reentrant: never
    take the same resource twice in one process."""
    with lock_file(resource).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_OTA_VM_CACHE", "/var/cache/edge-ota-vm"))


def base_tarball() -> Path:
    """The debootstrap'd bookworm base (minutes the first time, then cached)."""
    with exclusive(BASE):
        out = subprocess.run(["sh", str(MKBASE), str(cache_dir())], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def build_deb(outdir: Path) -> Path:
    """The edge-ota .deb of this checkout, built into `outdir` (a failure carries the script's own words)."""
    with exclusive(CHECKOUT):
        out = subprocess.run(["sh", str(BUILD_DEB), str(outdir)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"packaging/build-deb.sh exited {out.returncode}:\n{out.stderr[-3000:]}{out.stdout[-1000:]}")
    return Path(out.stdout.strip().splitlines()[-1])
