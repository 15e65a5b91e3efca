"""`ota-console`: the technician's client for the device's serial console
(docs/console.md). `main(argv) -> int`; one line per error (a traceback only with -v).

    ota-console PORT                          interactive, with line history
    ota-console PORT --cmd 'status' [--json]  one command, its reply, exit
    ota-console PORT put BUNDLE               upload and install, progress and ETA, resumes
    options: --baud N, --timeout S, --key TECH.key (answers challenges), --reconnect S

Exit status 0 when the device answered ok, 1 when it answered an error (or the
line failed). With --json the result object is printed as the device sent it
(for `status`, the document `ota-agent status --json` prints); an error is one
JSON object on stderr. `--cmd` and `put` confirm the device's question themselves
(the technician typed the command); interactive sessions ask.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import readline  # line history and editing for the interactive console
except ImportError:  # pragma: no cover - a Python built without it
    readline = None  # type: ignore[assignment]

from bundler.console.link import DeviceError, DeviceLink
from bundler.console.put import RECONNECT, PutStats, put
from bundler.format.signing import load_private_key
from ota_common.errors import OtaError
from ota_common.tty import Progress, run_reporting_errors, version_string

HISTORY = Path(os.environ.get("OTA_CONSOLE_HISTORY", "~/.ota_console_history")).expanduser()


class _Phases:
    """The device's progress lines as one bar per phase, on stderr."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.bar: Progress | None = None

    def __call__(self, doc: dict[str, Any]) -> None:
        job = doc.get("progress")
        p = job.get("progress") if isinstance(job, dict) else None
        if not isinstance(p, dict):
            if "notice" in doc:
                print(f"device: {doc['notice']}", file=sys.stderr)
            return
        if p.get("phase") != self.phase or self.bar is None:
            self.finish()
            self.phase, self.bar = str(p.get("phase")), Progress(f"device {p.get('phase')}")
        self.bar(int(p.get("done") or 0), int(p.get("total") or 0))

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.finish()
            self.bar = None


def _print(reply: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(reply.get("result"), indent=2 if reply.get("command") == "status" else None,
                         sort_keys=True))
    else:
        print(reply.get("text", ""))
    return 0 if reply.get("ok") else 1


def _one(link: DeviceLink, line: str, as_json: bool) -> int:
    phases = _Phases()
    try:
        reply = link.call(line, on_notice=phases)
    finally:
        phases.finish()
    return _print(reply, as_json)


def _put(link: DeviceLink, args: argparse.Namespace) -> int:
    phases = _Phases()
    stats = PutStats()
    try:
        reply = put(link, Path(args.action[1]), allow_downgrade=args.allow_downgrade, reconnect=args.reconnect,
                    on_notice=phases, stats=stats)
    finally:
        phases.finish()
    logging.getLogger(__name__).info("sent %d frames (%d again, %d refused), %d reconnects", stats.frames,
                                     stats.resent, stats.naks, stats.reconnects)
    return _print(reply, args.json)


def _interactive(link: DeviceLink, as_json: bool) -> int:
    if readline is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(HISTORY)
        readline.set_history_length(1000)

    def ask(question: dict[str, Any]) -> bool:
        if question.get("challenge") and link.key is not None:
            return True  # the technician typed it and holds the key: signing is the confirmation
        answer = input(f"{question.get('command')}: changes the device. Go ahead? [y/N] ")
        if readline is not None and readline.get_current_history_length():  # the answer is no command
            readline.remove_history_item(readline.get_current_history_length() - 1)
        return answer.strip().lower() in ("y", "yes")

    print("ota-console: connected; 'help' lists the commands, Ctrl-D ends", file=sys.stderr)
    status = 0
    try:
        while True:
            try:
                line = input("ota> ")
            except EOFError:
                print(file=sys.stderr)
                return status
            if not line.strip():
                continue
            phases = _Phases()
            try:
                reply = link.call(line, on_notice=phases, confirm=ask)
                status = _print(reply, as_json)
            except DeviceError as e:
                print(f"error: {e.reply.get('error', {}).get('message')}", file=sys.stderr)
                status = 1
            except OtaError as e:
                print(f"error: {e}", file=sys.stderr)
                status = 1
            finally:
                phases.finish()
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(HISTORY)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ota-console", description="the technician's side of an edge-ota serial console")
    p.add_argument("port", help="serial port, e.g. /dev/ttyUSB0")
    p.add_argument("action", nargs="*", help="put BUNDLE (upload and install); nothing: interactive")
    p.add_argument("--cmd", help="run one console command and exit, e.g. 'status'")
    p.add_argument("--json", action="store_true", help="the result as one JSON object")
    p.add_argument("--baud", type=int, default=115200, help="line speed (default 115200)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds without a byte from the device (default 10)")
    p.add_argument("--reconnect", type=float, default=RECONNECT,
                   help=f"put: seconds to wait for the line to come back (default {RECONNECT:g})")
    p.add_argument("--key", help="technician's Ed25519 private key (PEM): answers the device's challenges")
    p.add_argument("--allow-downgrade", action="store_true", help="put: accept a lower security version")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--version", action="version", version=version_string("ota-console"))
    return p


def _main(args: argparse.Namespace) -> int:
    key = load_private_key(Path(args.key)) if args.key else None
    link = DeviceLink(args.port, baud=args.baud, timeout=args.timeout, key=key)
    if args.action and not (args.action[0] == "put" and len(args.action) == 2):
        raise OtaError(f"unknown action {' '.join(args.action)!r}: use put BUNDLE, --cmd 'COMMAND', or nothing")
    if args.action and args.cmd:
        raise OtaError("give either --cmd or put, not both")
    link.open()
    try:
        if args.cmd:
            return _one(link, args.cmd, args.json)
        if args.action:
            return _put(link, args)
        return _interactive(link, args.json)
    finally:
        link.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="ota-console: %(message)s",
                        force=True)
    return run_reporting_errors("ota-console", lambda: _main(args), expected=(OtaError,), verbose=args.verbose,
                                json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
