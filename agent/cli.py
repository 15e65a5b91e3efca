"""`ota-agent`: the device commands of the command table (`agent.commands`:
install, media, status, mark-good/mark-bad, rollback, reboot, boot-check, cancel, job),
`media-poll` (the USB stick polling fallback), `run` (the daemon), `console --port DEV`
(one serial console, docs/console.md) and the simulated device (`sim init`, `sim boot`).

A thin adapter: it parses arguments into the table's parameters, runs the command
and prints its reply. While `ota-agent run` serves the local API (docs/api.md) the
command is sent to the daemon (so it joins the daemon's one job queue) and its reply
printed the same way; with no daemon it runs in this process (`install -` and
`boot-check` always do). `main(argv) -> int`; one line per error (a traceback only
with -v). `--json` on every device command: one JSON object with the result on
stdout, an error as one JSON object on stderr, and no log lines. `-c`/`-v` work
before or after the device commands' name."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import api_client, sim, wiring
from agent import config as config_mod
from agent.bootcheck import HealthOverride
from agent.commands import COMMANDS, Command, Reply, execute
from agent.jobs import JobState, JobView
from agent.logsetup import use_clean_lines
from ota_common.errors import OtaError
from ota_common.tty import Progress, run_reporting_errors, version_string

# Start-up is part of every command's time (an install's included): what only some
# commands use (the daemon, the console, the simulator, media polling; wiring's
# front ends) is imported by those commands, not here.

DEFAULT_CONFIG = "/etc/edge-ota/agent.toml"


class _PhasedProgress:
    """One progress display per install phase ("writing", "verifying read-back"),
    each counting up to the image size; fed by the job queue's updates."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.bar: Progress | None = None

    def __call__(self, view: JobView) -> None:
        p = view.progress
        if p is None or view.state is not JobState.RUNNING:
            return
        if p.phase != self.phase or self.bar is None:
            self.finish()
            self.phase, self.bar = p.phase, Progress(p.phase)
        self.bar(p.done, p.total)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.finish()
            self.bar = None


class CommandFailed(OtaError):
    """A command's job failed: carries the original error's type name for --json."""

    def __init__(self, message: str, kind: str | None) -> None:
        super().__init__(message)
        self.kind = kind or "OtaError"


def _command(args: argparse.Namespace) -> int:
    """Every device command of the table: the CLI only parses and prints. Sent to
    the running daemon when one serves the local API (so it joins the daemon's one
    job queue), run in this process otherwise."""
    command = COMMANDS[args.command]
    cli_args = {p.name: getattr(args, p.name) for p in command.params if hasattr(args, p.name)}
    progress = _PhasedProgress()
    show_progress = not args.json or sys.stderr.isatty()
    try:
        reply = _through_daemon(Path(args.config), command, cli_args, progress if show_progress else None)
        if reply is None:
            app = wiring.build_app(Path(args.config))
            if show_progress:
                app.queue.subscribe(progress)
            reply = execute(app, command.name, cli_args, origin="cli")
    finally:
        progress.finish()
    if reply.error is not None:
        raise CommandFailed(reply.error, reply.error_type)
    if args.json:
        print(json.dumps(reply.result, indent=2 if command.name == "status" else None, sort_keys=True))
    else:
        print(reply.text)
    return 0 if reply.ok else 1


PATH_PARAMS = ("source", "path", "bundle", "cert", "ca_cert")  # file arguments: made absolute for the daemon
STANDALONE = frozenset({"boot-check"})  # the boot's own assessment: runs before the daemon, in its own unit


def _through_daemon(
    config_path: Path, command: Command, cli_args: dict[str, Any], progress: _PhasedProgress | None
) -> Reply | None:
    """The command's reply from the daemon serving the config's API socket; None
    when none answers (or the command runs in this process anyway)."""
    source = cli_args.get("source")
    if command.name in STANDALONE or "-" in (source, cli_args.get("bundle")):  # stdin is ours, not the daemon's
        return None
    session = api_client.Session.open(config_mod.load(config_path).api)
    if session is None:
        return None
    for name in PATH_PARAMS:  # the daemon has its own working directory
        value = cli_args.get(name)
        if isinstance(value, str) and value != "-" and "://" not in value and not value.startswith("-----BEGIN"):
            cli_args = {**cli_args, name: os.path.abspath(value)}
    with session:
        return session.call(command.name, cli_args, on_progress=progress, starts_job=command.changes_state)


def _media_poll(args: argparse.Namespace) -> int:
    """The polling fallback (agent.media.poll): `media` on every removable device
    that appeared since the last poll; exit 1 when any of them failed."""
    from agent.media import poll  # noqa: PLC0415 - start-up: only this command polls

    cfg = config_mod.load(Path(args.config))
    failed = 0
    for found in poll.new_devices(cfg.state_dir, Path(args.sysfs)):
        path = Path(args.dev) / found.name
        try:
            _command(argparse.Namespace(command="media", path=str(path), config=args.config, json=False))
        except OtaError as e:
            failed += 1
            print(f"ota-agent: error: {path}: {e}", file=sys.stderr)
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    from agent import service  # noqa: PLC0415 - start-up: only the daemon commands serve

    app = wiring.build_app(Path(args.config))
    return service.run(app, wiring.front_ends(app), wiring.notifier())


def _console(args: argparse.Namespace) -> int:
    """One serial console served by this process (systemd/ota-console@.service)."""
    from agent import service  # noqa: PLC0415 - start-up: only the daemon commands serve
    from agent.console.port import ConsolePort  # noqa: PLC0415

    app = wiring.build_app(Path(args.config))
    front = ConsolePort(app.device.config.console, args.port, baud=args.baud)
    return service.run(app, [front], wiring.notifier())


def _trial_watchdog(args: argparse.Namespace) -> int:
    from agent import trialwatch  # noqa: PLC0415 - start-up: only early boot runs it

    return trialwatch.run(Path(args.config))


def _sim_init(args: argparse.Namespace) -> int:
    spec = sim.SimSpec(
        directory=Path(args.dir),
        image=Path(args.image),
        keyring=Path(args.keyring),
        compatible=args.compatible,
        tries=args.tries,
        bootloader=args.bootloader,
        version=args.version,
        slot_size=args.slot_size,
        mqtt=args.mqtt,
        device_id=args.device_id,
        groups=tuple(args.group),
    )
    path = sim.init(spec)
    print(f"simulated device ready: {path} (slots A and B hold {args.image}, A booted)")
    return 0


def _sim_boot(args: argparse.Namespace) -> int:
    health = HealthOverride(args.health) if args.health else None
    boots = sim.power_on(Path(args.dir), health=health)
    print(f"settled on slot {boots[-1].slot} after {len(boots)} boot(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    config_help = f"agent config (default {DEFAULT_CONFIG})"
    parser = argparse.ArgumentParser(prog="ota-agent", description="edge-ota device agent")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=config_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=version_string("ota-agent"))
    parser.set_defaults(json=False)
    # The same options after a device command's name; SUPPRESS keeps the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    reporting = argparse.ArgumentParser(add_help=False, parents=[common])
    reporting.add_argument("--json", action="store_true", help="the result as one JSON object (errors on stderr)")
    sub = parser.add_subparsers(dest="command", required=True)

    for command in COMMANDS.values():
        _add_command(sub, command, reporting)

    p = sub.add_parser("media-poll", parents=[common], help="run media on removable devices inserted since the "
                       "last poll (the fallback where udev does not start ota-media@.service)")
    p.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    p.add_argument("--dev", default="/dev", help=argparse.SUPPRESS)
    p.set_defaults(func=_media_poll)
    bootp = sub.add_parser("bootloader", help="the bootloader's state (bootloader init: set up a new device)")
    bootsub = bootp.add_subparsers(dest="bootloader_command", required=True)
    _add_command(bootsub, COMMANDS["bootloader-init"], reporting, name="init")

    p = sub.add_parser("run", parents=[common], help="run as the device's service (systemd Type=notify, watchdog)")
    p.set_defaults(func=_run)

    p = sub.add_parser("trial-watchdog", parents=[common], help="from early boot: arm the watchdog in a trial boot "
                       "until boot-check takes it over or [watchdog] trial_deadline passes")
    p.set_defaults(func=_trial_watchdog)
    p = sub.add_parser("console", parents=[common], help="serve a technician's serial console on one port")
    p.add_argument("--port", required=True, help="serial device, e.g. /dev/ttyS0")
    p.add_argument("--baud", type=int, help="line speed (default: [console] baud, 115200)")
    p.set_defaults(func=_console)

    simp = sub.add_parser("sim", help="a simulated device in a directory")
    simsub = simp.add_subparsers(dest="sim_command", required=True)
    p = simsub.add_parser("init", help="create a simulated device")
    p.add_argument("dir")
    p.add_argument("--image", required=True, help="image both slots start with")
    p.add_argument("--keyring", required=True, help=".pub file or directory of trusted keys")
    p.add_argument("--compatible", required=True)
    p.add_argument("--tries", type=int, default=3, help="boot attempts for a new slot (default 3)")
    p.add_argument("--bootloader", default="sim", choices=sorted(sim.ENV_PATHS), help="bootloader state format")
    p.add_argument("--version", default="factory", help="version recorded for the initial image")
    p.add_argument("--slot-size", type=int, default=0, help="slot file size in bytes (default 2x image, >= 64 MiB)")
    p.add_argument("--mqtt", metavar="URL", help="broker for `run` (mqtt://host:port or mqtts://...): writes [mqtt]")
    p.add_argument("--device-id", help="the device's MQTT id (with --mqtt)")
    p.add_argument("--group", action="append", default=[], help="an MQTT group to join (repeatable)")
    p.set_defaults(func=_sim_init)
    p = simsub.add_parser("boot", help="power on the simulated device until it settles")
    p.add_argument("dir")
    p.add_argument(
        "--health",
        choices=[h.value for h in HealthOverride],
        help="force health checks to pass, fail, or hang (then the simulated watchdog resets the board)",
    )
    p.set_defaults(func=_sim_boot)
    return parser


def _add_command(sub: Any, command: Command, parent: argparse.ArgumentParser, name: str | None = None) -> None:
    """A subcommand from the table: a required string is a positional argument, an
    optional `slot`/`job` an optional positional one, a bool a --flag (--no-NAME when
    it defaults to true)."""
    p = sub.add_parser(name or command.name, parents=[parent], help=command.help)
    for param in command.params:
        if param.type is bool:
            if param.default:
                p.add_argument(f"--no-{param.name.replace('_', '-')}", dest=param.name, action="store_false",
                               help=f"do not {param.help.removesuffix(' (default)')}")
            else:
                p.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name, action="store_true",
                               help=param.help)
        elif param.option:
            p.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name, required=param.required,
                           default=param.default, help=param.help)
        elif param.required:
            p.add_argument(param.name, help=param.help)
        else:
            p.add_argument(param.name, nargs="?", default=param.default, help=param.help)
    p.set_defaults(func=_command, command=command.name)


def _not_failures(record: logging.LogRecord) -> bool:
    """A failure event is printed as the CLI's one error line; don't log it twice."""
    event = getattr(record, "ota_event", None)
    return not (isinstance(event, dict) and event.get("result") == "failed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = bool(args.json)
    # Under --json stderr carries only an error object: no INFO lines beside it.
    level = logging.DEBUG if args.verbose else logging.WARNING if as_json else logging.INFO
    logging.basicConfig(level=level, format="ota-agent: %(message)s", force=True)
    use_clean_lines("ota-agent: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_failures)
    return run_reporting_errors(
        "ota-agent", lambda: int(args.func(args)), expected=(OtaError,), verbose=args.verbose, json_errors=as_json
    )


if __name__ == "__main__":
    sys.exit(main())
