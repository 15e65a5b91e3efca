"""Bundle upload over the serial console: framing efficiency and throughput.

A pty pair enforces no baud rate, so two things are measured:

1. Framing efficiency: a real `put` (ota-console's send loop, the device's console
   and install path) of a bundle through a relay between two pty pairs, per frame
   size: payload bytes / bytes on the host -> device wire (frame headers, CRCs, the
   upload command, frames sent again). From it, the time the transfer takes at
   115200 baud and at 3 Mbaud (8N1: 10 bits a byte on the wire).
2. Real throughput over the same relay rate-limited to each line's byte rate
   (11,520 B/s and 300,000 B/s): wall time from `upload` to the install's result,
   so credit round trips, the device's parsing and the install itself count too.

The device is a simulated one (`ota-agent sim init`) served in this process by the
real `ConsolePort`; the host side is `bundler.console.put`. Not a pass/fail test:
it prints a table (bench/README.md has one run's numbers).

Usage: .venv/bin/python -m bench.console [--image-kib N] [--slow-image-kib N] [--frames 256,1024,4096,16384]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from agent import sim, wiring
from agent.console.port import ConsolePort
from bundler.build import BundleSpec, build_full
from bundler.console.link import DeviceLink
from bundler.console.put import PutStats, put
from bundler.format.signing import generate_key
from ota_common.frames import efficiency
from tests.fixtures.serial_line import Relay

COMPATIBLE = "edge-ota-bench"
LINES = {"115200": 115200 / 10, "3M": 3_000_000 / 10}  # bytes a second, 8N1


def _image(path: Path, kib: int, seed: int) -> Path:
    """Half random, a quarter text-like, a quarter zeros: a bundle of realistic compressibility."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < kib * 1024:
        kind = rng.randrange(4)
        n = rng.randrange(4096, 65536)
        if kind < 2:
            out += rng.randbytes(n)
        elif kind == 2:
            out += bytes(rng.choice(b"etaoin shrdlu\n") for _ in range(n))
        else:
            out += bytes(n)
    path.write_bytes(bytes(out[: kib * 1024]))
    return path


def _device(work: Path, name: str, image: Path, public: Path, frame: int) -> tuple[Path, Relay]:
    directory = work / name
    sim.init(sim.SimSpec(directory=directory, image=image, keyring=public, compatible=COMPATIBLE,
                         slot_size=64 << 20))
    relay = Relay()
    config = sim.config_path(directory)
    with config.open("a") as f:
        f.write(f'\n[console]\nports = ["{relay.device.path}"]\nframe_size = {frame}\n')
    return config, relay


def _upload(config: Path, relay: Relay, bundle: Path, rate: float | None) -> tuple[PutStats, float]:
    app = wiring.build_app(config)
    front = next(f for f in wiring.front_ends(app) if isinstance(f, ConsolePort))
    front.start(app)
    try:
        link = DeviceLink(relay.host.path, timeout=30.0)
        link.open()
        relay.rate = rate
        stats = PutStats()
        start = time.monotonic()
        reply = put(link, bundle, stats=stats, progress=lambda done, total: None)
        elapsed = time.monotonic() - start
        link.close()
        if not reply.get("ok"):
            raise SystemExit(f"the upload failed: {reply}")
        return stats, elapsed
    finally:
        front.stop()
        relay.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-kib", type=int, default=8192, help="image for the efficiency runs (default 8 MiB)")
    p.add_argument("--slow-image-kib", type=int, default=256,
                   help="image for the rate-limited runs (default 256 KiB: ~20 s at 115200)")
    p.add_argument("--frames", default="256,1024,4096,16384", help="frame payload sizes to try")
    args = p.parse_args(argv)
    frames = [int(x) for x in args.frames.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        work = Path(tmp)
        _, public = generate_key(work / "key")
        private = work / "key" / "signing.key"
        factory = _image(work / "factory.img", args.image_kib, 1)
        results = []
        for name, kib, seed in (("big", args.image_kib, 2), ("small", args.slow_image_kib, 3)):
            image = _image(work / f"{name}.img", kib, seed)
            bundle = work / f"{name}.otab"
            build_full(BundleSpec(image=image, key=private, version=f"2.0-{name}", security_version=2,
                                  compatible=COMPATIBLE, threads=2), bundle)
            results.append(bundle)
        big, small = results
        print(f"bundle {big.stat().st_size} bytes (image {args.image_kib} KiB); framing, unlimited pty relay")
        print(f"{'frame':>7} {'frames':>7} {'again':>6} {'payload/wire':>13} {'format':>8} "
              f"{'at 115200':>10} {'at 3M':>8} {'pty MB/s':>9}")
        for frame in frames:
            config, relay = _device(work, f"eff-{frame}", factory, public, frame)
            stats, elapsed = _upload(config, relay, big, None)
            eff = stats.payload / stats.wire
            size = big.stat().st_size
            t115 = size / (LINES["115200"] * eff)
            t3m = size / (LINES["3M"] * eff)
            print(f"{frame:>7} {stats.frames:>7} {stats.resent:>6} {eff:>13.4f} {efficiency(frame):>8.4f} "
                  f"{t115 / 60:>8.1f} m {t3m:>6.1f} s {size / elapsed / 1e6:>9.2f}")
        print()
        print(f"bundle {small.stat().st_size} bytes; real throughput over a rate-limited pty relay, frames of 4096")
        print(f"{'line':>8} {'line B/s':>9} {'seconds':>8} {'payload B/s':>12} {'of line':>8}")
        for line, rate in LINES.items():
            bundle = small if line == "115200" else big
            config, relay = _device(work, f"rate-{line}", factory, public, 4096)
            stats, elapsed = _upload(config, relay, bundle, rate)
            size = bundle.stat().st_size
            print(f"{line:>8} {rate:>9.0f} {elapsed:>8.1f} {size / elapsed:>12.0f} {size / elapsed / rate:>8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
