"""`python -m tests.reliability.outbox_driver --root DIR --log LOGDIR -- WHAT STATE_DIR`,
under the power-cut tracer:

* `outbox`: queue three reports in the outbox at STATE_DIR and acknowledge the
  first two (what the MQTT reporter does after the broker's PUBACK), so the
  crash point `outbox-after-ack` can cut it there;
* `journal`: accept an MQTT install job into the job journal at STATE_DIR the
  way the intake does (`parse_job`, `Journal.admit`), then pass the intake's
  crash point `mqtt-job-journalled` (the job is journalled, not yet answered
  or acknowledged to the broker)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.crashpoint import crashpoint
from agent.events import Event
from agent.mqtt.journal import Journal
from agent.mqtt.schema import parse_job
from agent.outbox import EventLog
from tests.powercut.tracer import Tracer

JOB = (b'{"schema": 1, "id": "j1", "type": "install", "created": "2026-01-01T00:00:00Z", '
       b'"url": "https://updates.example/b.otab"}')


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="outbox_driver")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    what, state_dir = args.rest[-2], Path(args.rest[-1])
    tracer = Tracer(args.root, args.log)
    tracer.install()
    try:
        if what == "journal":
            journal = Journal(state_dir / "jobs.journal")
            journal.admit(parse_job(JOB))
            crashpoint("mqtt-job-journalled")
        else:
            log = EventLog(state_dir)
            for txn in ("t1", "t2", "t3"):
                log.emit(Event(event="install", result="ok", txn=txn))
            log.outbox.ack(log.outbox.pending()[1].seq)
    finally:
        tracer.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
