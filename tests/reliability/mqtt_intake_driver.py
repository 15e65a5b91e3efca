"""`python -m tests.reliability.mqtt_intake_driver --root DIR --log LOGDIR -- SPEC.json`:
the device of the MQTT component tests (`tests.component._mqtt_device`: the
real MQTT channel, link, intake and journal, over a real broker) under the
power-cut tracer, so a job published to it is accepted by the real intake and
the process dies at the intake's crash point `mqtt-job-journalled` (the job
journalled, neither handed on nor answered, no PUBACK sent)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.component._mqtt_device import main as device_main
from tests.powercut.tracer import Tracer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mqtt_intake_driver")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    tracer = Tracer(args.root, args.log)
    tracer.install()
    try:
        return device_main(args.rest[-1])
    finally:
        tracer.uninstall()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
