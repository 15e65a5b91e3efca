"""`python -m tests.reliability.outbox_driver --root DIR --log LOGDIR -- outbox STATE_DIR`,
under the power-cut tracer: queue three reports in the outbox at STATE_DIR and
acknowledge the first two (what the MQTT reporter does after the broker's
PUBACK), so the crash point `outbox-after-ack` can cut it there. (Accepting an
MQTT job runs through the real intake: tests.reliability.mqtt_intake_driver.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.events import Event
from agent.outbox import EventLog
from tests.powercut.tracer import Tracer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="outbox_driver")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    state_dir = Path(args.rest[-1])
    tracer = Tracer(args.root, args.log)
    tracer.install()
    try:
        log = EventLog(state_dir)
        for txn in ("t1", "t2", "t3"):
            log.emit(Event(event="install", result="ok", txn=txn))
        log.outbox.ack(log.outbox.pending()[1].seq)
    finally:
        tracer.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
