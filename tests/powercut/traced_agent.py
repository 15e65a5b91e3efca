"""`python -m tests.powercut.traced_agent --root DIR --log LOGDIR -- ARGV...`: runs
`agent.cli.main(ARGV)` with every durable file operation under DIR recorded
(`tests.powercut.tracer`), and every report the agent's event log acknowledged
marked in the same log. Exits with the agent's status.

`--without MODULE:NAME` (repeatable) replaces a function with one that does
nothing, e.g. ``ota_common.fsutil:fsync_dir``: the harness's own tests use it to prove
that a missing fsync is found."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent import events, outbox
from agent.cli import main as agent_main
from tests.powercut.tracer import Tracer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="traced_agent")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--without", action="append", default=[], metavar="MODULE:NAME")
    parser.add_argument("agent_argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    agent_argv = args.agent_argv[1:] if args.agent_argv[:1] == ["--"] else args.agent_argv

    for target in args.without:
        disable(target)
    tracer = Tracer(args.root, args.log)
    emit = outbox.EventLog.emit

    def acknowledged(self: outbox.EventLog, event: events.Event, **kwargs: Any) -> Any:
        out = emit(self, event, **kwargs)
        tracer.ack(asdict(out if isinstance(out, events.Event) else event))
        return out

    outbox.EventLog.emit = acknowledged  # type: ignore[method-assign]
    tracer.install()
    try:
        rc = agent_main(agent_argv)
    finally:
        tracer.uninstall()
    if tracer.unsupported:
        print("traced_agent: untraceable operations: " + "; ".join(tracer.unsupported), file=sys.stderr)
        return 99
    return rc


def disable(target: str) -> None:
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    getattr(owner, name)  # must exist

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    setattr(owner, name, nothing)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
