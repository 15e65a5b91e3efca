"""`python -m tests.reliability.etc_driver --root DIR --log LOGDIR -- OLD CURRENT SLOT_ROOT`:
the /etc merge (`agent.etcmerge.merge_trees`) of OLD and CURRENT into the
slot tree SLOT_ROOT, under the power-cut tracer (DIR holds all three), so the
crash points `etc-merge-before-swap` and `etc-merge-after-swap` can cut it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.etcmerge import EtcConfig, merge_trees
from tests.powercut.tracer import Tracer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="etc_driver")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    old, current, slot = (Path(a) for a in args.rest[-3:])
    tracer = Tracer(args.root, args.log)
    tracer.install()
    try:
        merge_trees(old, current, slot, EtcConfig(merge=True))
    finally:
        tracer.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
