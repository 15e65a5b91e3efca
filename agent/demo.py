"""`make demo`: the whole update cycle on a simulated device, in under a minute.

Builds three small real root filesystem images (ext4 via `mkfs.ext4 -d` when
available, otherwise generated data), a signing key, a simulated device on v1,
and bundles v2 and v3 served by a local HTTP server; installs v2, boots and
commits it; installs v3, whose health check fails, and shows the automatic
rollback to v2. It drives the same commands a user types (`ota-bundle`,
`ota-agent`), each as a subprocess.
"""

from __future__ import annotations

import functools
import http.server
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

IMAGE_SIZE = 48 << 20
WORK = Path("demo-run")


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(*args: str) -> None:
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / args[0]) if (bindir / args[0]).exists() else args[0], *args[1:]]
    print("    $ " + " ".join([args[0], *args[1:]]), flush=True)
    subprocess.run(cmd, check=True)


def make_tree(root: Path, version: str, seed: int) -> None:
    rng = random.Random(seed)
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/share/doc").mkdir(parents=True)
    (root / "etc/os-release").write_text(f'NAME="Demo OS"\nVERSION_ID="{version}"\n')
    # An "application binary" (incompressible) that changes between versions,
    (root / "usr/bin/app").write_bytes(rng.randbytes(3 << 20))
    # and documentation-like text that compresses well.
    words = ["update", "slot", "boot", "device", "bundle", "signed", "rollback", "commit", "health"]
    for i in range(40):
        text = " ".join(rng.choice(words) for _ in range(8000))
        (root / f"usr/share/doc/page{i}.txt").write_text(text)


def make_image(path: Path, version: str, seed: int) -> str:
    tree = path.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    make_tree(tree, version, seed)
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs:
        with path.open("wb") as f:
            f.truncate(IMAGE_SIZE)
        subprocess.run(
            [mkfs, "-q", "-F", "-L", "rootfs", "-E", "root_owner=0:0", "-U", "clear", "-d", str(tree), str(path)],
            check=True,
            env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
        )
        kind = "ext4"
    else:
        with path.open("wb") as f:
            for file in sorted(tree.rglob("*")):
                if file.is_file():
                    f.write(file.read_bytes())
            f.truncate(IMAGE_SIZE)
        kind = "generated data (mkfs.ext4 not found)"
    shutil.rmtree(tree)
    return kind


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        print(f"    [http] {self.address_string()} {format % args}", flush=True)


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    images, keys, bundles, device = WORK / "images", WORK / "keys", WORK / "www", WORK / "device"
    for d in (images, bundles):
        d.mkdir(parents=True)

    step("Building three small root filesystem images: v1, v2, v3")
    for n in (1, 2, 3):
        kind = make_image(images / f"rootfs-v{n}.img", f"{n}.0", seed=n)
        print(f"    rootfs-v{n}.img: {IMAGE_SIZE >> 20} MiB, {kind}")

    step("Creating a signing key (the build host keeps signing.key; devices trust signing.pub)")
    run("ota-bundle", "keygen", str(keys))

    step("Creating a simulated device running v1 (two slot files, a simulated bootloader, A booted)")
    run("ota-agent", "sim", "init", str(device), "--image", str(images / "rootfs-v1.img"),
        "--keyring", str(keys / "signing.pub"), "--compatible", "demo-board", "--version", "1.0")
    config = str(device / "agent.toml")

    step("Building signed bundles for v2 and v3")
    for n in (2, 3):
        run("ota-bundle", "create", "--image", str(images / f"rootfs-v{n}.img"), "--key", str(keys / "signing.key"),
            "--version", f"{n}.0", "--security-version", str(n), "--compatible", "demo-board",
            "-o", str(bundles / f"demo-v{n}.otab"))

    server, url = serve(bundles)
    try:
        step(f"Serving the bundles over HTTP at {url}; installing v2 into the inactive slot (B)")
        run("ota-agent", "-c", config, "install", f"{url}/demo-v2.otab")

        step("Rebooting: the bootloader tries B; the health checks pass, so the agent commits it")
        run("ota-agent", "sim", "boot", str(device))

        step("Installing v3 into the now inactive slot (A)")
        run("ota-agent", "-c", config, "install", f"{url}/demo-v3.otab")

        step("Rebooting: v3 has a bug and its health checks fail, so the device rolls back to v2")
        run("ota-agent", "sim", "boot", str(device), "--health", "fail")
    finally:
        server.shutdown()
        server.server_close()

    step("Final status")
    run("ota-agent", "-c", config, "status")
    print(f"\nDemo finished in {time.monotonic() - started:.1f}s. Everything it made is in {WORK}/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
