"""`ota-fleet provision`: the station's command line over `bundler.fleet.provision`,
with the console client's link and upload (`bundler.console`).

    ota-fleet provision --port PORT [--port PORT ...] --bundle FULL.otab
                        [--ca CA.key --ca-cert CA.pem] [--device-id ID ...] [--broker URL]
                        [--key TECH.key] [--baud B] [--timeout S] --log factory.jsonl
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from bundler.console.link import DeviceLink
from bundler.console.put import put
from bundler.fleet.provision import Link, StationError, StationSpec, run_station, summary
from bundler.fleet.provision_ca import load_ca
from bundler.format.signing import load_private_key


def add_parser(sub: Any) -> None:
    p = sub.add_parser("provision", help="provision devices over their serial consoles (a factory station)")
    p.add_argument("--port", action="append", required=True, help="a serial port (repeatable: one worker each)")
    p.add_argument("--bundle", required=True, help="the full bundle every device gets in both slots")
    p.add_argument("--ca", dest="ca_key", help="the factory CA's private key: sign each device's CSR")
    p.add_argument("--ca-cert", help="the factory CA's certificate (with --ca)")
    p.add_argument("--device-id", action="append", default=[], help="one id per --port, in order "
                   "(default: each device names itself from its key)")
    p.add_argument("--broker", help="mqtt[s]://host:port written into each device config")
    p.add_argument("--key", help="technician's Ed25519 private key: answers the devices' challenges")
    p.add_argument("--baud", type=int, default=115200, help="line speed (default 115200)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without a byte before a line counts as lost")
    p.add_argument("--reconnect", type=float, default=60.0,
                   help="seconds an upload keeps trying to get a lost line back (default 60)")
    p.add_argument("--log", required=True, help="the factory log: one JSON line per device is appended")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.ca_key) != bool(args.ca_cert):
        raise StationError("--ca and --ca-cert go together")
    ca = load_ca(Path(args.ca_key), Path(args.ca_cert)) if args.ca_key else None
    spec = StationSpec(ports=tuple(args.port), bundle=Path(args.bundle), log=Path(args.log), ca=ca,
                       device_ids=tuple(args.device_id), broker=args.broker)
    key = load_private_key(Path(args.key)) if args.key else None
    links: list[Link] = [DeviceLink(p, baud=args.baud, timeout=args.timeout, key=key) for p in spec.ports]
    logging.getLogger("bundler.console").setLevel(logging.WARNING)

    def upload(link: Link, bundle: Path, extra: str, progress: Any) -> dict[str, Any]:
        assert isinstance(link, DeviceLink)
        return put(link, bundle, progress=progress, reconnect=args.reconnect)

    records = run_station(spec, links, upload)
    print(summary(records))
    return 0 if all(r.result == "provisioned" for r in records) else 1
