"""`ota-fleet`: the operator's command line. `main(argv) -> int`; one line per
error (a traceback only with -v)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from bundler.fleet.serve import BundleServer
from ota_common.errors import OtaError
from ota_common.tty import run_reporting_errors, version_string


def _serve(args: argparse.Namespace) -> int:
    server = BundleServer(Path(args.dir), args.bind, args.port)
    print(f"serving {args.dir} at {server.url}/ (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    server.start()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ota-fleet", description="edge-ota operator tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=version_string("ota-fleet"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve a directory of bundles over HTTP (Range requests supported)")
    p.add_argument("dir", help="directory whose files are served")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="ota-fleet: %(message)s")
    return run_reporting_errors(
        "ota-fleet", lambda: int(args.func(args)), expected=(OtaError, ValueError), verbose=args.verbose
    )


if __name__ == "__main__":
    sys.exit(main())
