"""The fleet benchmark's bundle origin with a chosen listen backlog:
`bundler.fleet.serve.BundleServer` (what `ota-fleet serve` runs) whose
`request_queue_size` is `--backlog` instead of socketserver's default of 5, so
the benchmark can show how much of a deploy's spread is the origin's accept
queue turning a thousand simultaneous downloads away (`ota-fleet serve`
itself is the default origin; this one runs with `--origin-backlog N`).

    python -m bench.origin DIR --port P --backlog N

Owns nothing but the backlog; serving is BundleServer's.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from bundler.fleet.serve import BundleServer


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.origin", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--backlog", type=int, required=True)
    args = p.parse_args(argv)
    server_class = type("BackloggedServer", (BundleServer,), {"request_queue_size": args.backlog})
    server = server_class(args.dir, args.bind, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(f"serving {args.dir} at {server.url}/ (listen backlog {args.backlog})", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
