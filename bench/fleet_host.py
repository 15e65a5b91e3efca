"""One process of the fleet benchmark (`bench/fleet.py`): hosts many simulated
devices, each running the agent's real code as `ota-agent run` does.

Per device: a simulated device directory (`agent.sim.init` with an `[mqtt]`
table: small slot files, its own state directory, outbox and job journal), the
application the composition root builds for it (`agent.wiring.build_app`: the
device's backends and, because its reboot command is the simulator's, the
in-process power cycle followed by boot-check), and the front ends that root
enables for its config (`agent.wiring.front_ends`: the MQTT front end, i.e.
one `MqttChannel` with its own paho client, client id, reporter and job
journal). Nothing of the agent is replaced or patched; what `ota-agent run`
adds on top (`agent.service.run`: signal handlers, sd_notify, the idle loop)
is per process, not per device, and is left out.

Talks to the benchmark over stdin/stdout, one JSON object per line:
  -> {"event": "created", "seconds": S}         the device directories exist
  <- "start"
  -> {"event": "started", "seconds": S, ...}    every front end started (connects are staggered)
  <- "stop"                                     stop every front end
  -> {"event": "stopped", "seconds": S, ...}
The agent's log lines (INFO, as the daemon's) go to `--log`.

Owns the hosting only; measuring is bench/fleet.py's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from agent import sim, wiring
from agent.service import FrontEnd


def device_id(index: int) -> str:
    return f"dev-{index:04d}"


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _threads() -> int:
    return threading.active_count()


def _wait_for(word: str) -> bool:
    """Read commands until `word`; False at the end of input (the benchmark is gone)."""
    return any(line.strip() == word for line in sys.stdin)


def create(args: argparse.Namespace, indices: range, brokers: list[str]) -> list[Path]:
    dirs = []
    for i in indices:
        d = args.root / device_id(i)
        if not sim.config_path(d).exists():
            sim.init(sim.SimSpec(directory=d, image=args.image, keyring=args.keyring, compatible=args.compatible,
                                 slot_size=args.slot_size, mqtt=brokers[i % len(brokers)], device_id=device_id(i),
                                 groups=(args.group,)))
        dirs.append(d)
    return dirs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.fleet_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="parent of the device directories")
    p.add_argument("--first", type=int, required=True, help="index of the first device")
    p.add_argument("--count", type=int, required=True, help="devices hosted by this process")
    p.add_argument("--broker", action="append", required=True,
                   help="broker URL (repeatable: device i connects to broker i mod count)")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--keyring", type=Path, required=True)
    p.add_argument("--compatible", required=True)
    p.add_argument("--slot-size", type=int, required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--stagger", type=float, default=0.02, help="seconds between two devices' starts")
    p.add_argument("--log", type=Path, required=True)
    args = p.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.INFO, filename=str(args.log),
                        format="%(asctime)s %(threadName)s %(name)s: %(message)s")

    began = time.monotonic()
    dirs = create(args, range(args.first, args.first + args.count), args.broker)
    _say(event="created", seconds=round(time.monotonic() - began, 2), devices=len(dirs))

    if not _wait_for("start"):
        return 1
    began = time.monotonic()
    running: list[FrontEnd] = []
    for d in dirs:
        app = wiring.build_app(sim.config_path(d))
        for front in wiring.front_ends(app):
            front.start(app)
            running.append(front)
        time.sleep(args.stagger)
    _say(event="started", seconds=round(time.monotonic() - began, 2), front_ends=len(running), threads=_threads(),
         nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    _wait_for("stop")
    began = time.monotonic()
    threads = _threads()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for stopping in [pool.submit(front.stop) for front in running]:
            try:
                stopping.result()
            except Exception:
                logging.exception("a front end did not stop cleanly")
    _say(event="stopped", seconds=round(time.monotonic() - began, 2), threads_before_stop=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
