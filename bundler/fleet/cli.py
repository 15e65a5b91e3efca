"""`ota-fleet`: the operator's command line (`serve`, `deploy`, `status`).
`main(argv) -> int`; one line per error (a traceback only with -v).

    ota-fleet serve DIR [--port P] [--bind ADDR]
    ota-fleet --broker URL deploy (--device ID ... | --group G) --url BUNDLE_URL [--wait] [--timeout S] [--json]
    ota-fleet --broker URL deploy --device ID --file BUNDLE [--chunk-size N] [--wait] ...
    ota-fleet --broker URL status [--device ID ...] [--json]
    ota-fleet provision --port PORT [--port ...] --bundle FULL.otab [--ca CA.key --ca-cert CA.pem] --log F

The broker options (`--broker`, `--ca`, `--cert`, `--key`, `--username`,
`--password-file`, `--protocol`, `--prefix`) are those of a device's `[mqtt]`
table and go before the command's name."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from agent.mqtt.schema import DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK
from bundler.fleet import provision_cli
from bundler.fleet.broker import BrokerOptions, FleetError
from bundler.fleet.deploy import DeploySpec, deploy
from bundler.fleet.serve import BundleServer
from bundler.fleet.status import status
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


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _options(args: argparse.Namespace) -> BrokerOptions:
    if not args.broker:
        raise FleetError(f"{args.command} needs --broker URL (before the command: ota-fleet --broker URL "
                         f"{args.command} ...)")
    return BrokerOptions(url=args.broker, ca=_path(args.ca), cert=_path(args.cert), key=_path(args.key),
                         username=args.username, password_file=_path(args.password_file), protocol=args.protocol,
                         prefix=args.prefix, timeout=args.connect_timeout)


def _deploy(args: argparse.Namespace) -> int:
    spec = DeploySpec(url=args.url or "", devices=args.device or None, group=args.group, wait=args.wait,
                      timeout=args.timeout, job_id=args.job_id, expires=args.expires, expect=args.expect,
                      allow_downgrade=args.allow_downgrade, as_json=args.json, file=_path(args.file),
                      chunk_size=args.chunk_size)
    return deploy(_options(args), spec)


def _status(args: argparse.Namespace) -> int:
    return status(_options(args), args.device or None, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ota-fleet", description="edge-ota operator tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=version_string("ota-fleet"))
    broker = parser.add_argument_group("broker (deploy, status)")
    broker.add_argument("--broker", metavar="URL", help="mqtt://host[:port] or mqtts://host[:port]")
    broker.add_argument("--ca", help="CA file for an mqtts:// broker (default: the system's CAs)")
    broker.add_argument("--cert", help="client certificate (with --key)")
    broker.add_argument("--key", help="client key (with --cert)")
    broker.add_argument("--username")
    broker.add_argument("--password-file", help="file holding the password (with --username)")
    broker.add_argument("--protocol", default="3.1.1", choices=["3.1.1", "5"], help="MQTT version (default 3.1.1)")
    broker.add_argument("--prefix", default="edge-ota", help="topic prefix of the devices (default edge-ota)")
    broker.add_argument("--connect-timeout", type=float, default=15.0, help="seconds to connect, subscribe, publish")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve a directory of bundles over HTTP (Range requests supported)")
    p.add_argument("dir", help="directory whose files are served")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("deploy", help="send an install job to devices or a group and follow it")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", help="a device id (repeatable): one job per device")
    who.add_argument("--group", help="a group name: one job for every member")
    bundle = p.add_mutually_exclusive_group(required=True)
    bundle.add_argument("--url", help="http(s) URL of the bundle, as the devices reach it")
    bundle.add_argument("--file", help="a bundle file streamed to one --device over the broker (install-stream)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                   help=f"--file: bytes per chunk message ({MIN_CHUNK}..{MAX_CHUNK}, default {DEFAULT_CHUNK})")
    p.add_argument("--wait", action="store_true", help="follow until every device succeeded, failed or rolled back")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds to follow (default 600 with --wait, else 60 for the first answers)")
    p.add_argument("--json", action="store_true", help="one JSON object per device result")
    p.add_argument("--job-id", help="the job id (default: a new one); the same id re-sends the same job")
    p.add_argument("--expires", type=float, default=0.0, help="seconds after which a device refuses the job")
    p.add_argument("--expect", type=int, default=0, help="group jobs: the number of devices to wait for")
    p.add_argument("--allow-downgrade", action="store_true", help="ask for a downgrade (the device still decides)")
    p.set_defaults(func=_deploy)

    p = sub.add_parser("status", help="each device's last known state, from the retained topics")
    p.add_argument("--device", action="append", help="a device id (repeatable; default: every device)")
    p.add_argument("--json", action="store_true", help="one JSON object per device")
    p.set_defaults(func=_status)

    provision_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="ota-fleet: %(message)s")
    return run_reporting_errors(
        "ota-fleet", lambda: int(args.func(args)), expected=(OtaError, ValueError), verbose=args.verbose
    )


if __name__ == "__main__":
    sys.exit(main())
