"""`ota-agent`: install, status, boot-check, mark-good/mark-bad, and the
simulated device (`sim init`, `sim boot`). `main(argv) -> int`; one line per
error (a traceback only with -v). `--json` on every command that reports
(install, status, boot-check, mark-good, mark-bad): one JSON object with the
result on stdout, an error as one JSON object on stderr, and no log lines.
`-c`/`-v` work before or after the device commands' name."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import service, sim
from agent.bootcheck import HealthOverride, boot_check
from agent.daemon import Device, build_device
from agent.events import Event
from agent.installer import InstallResult, Phase, install
from agent.logsetup import use_clean_lines
from agent.marking import Verdict, mark
from agent.sources import source_for
from agent.status import render, status
from bundler.format.errors import OtaError
from hw.power import reboot
from hw.tty import Progress, run_reporting_errors, version_string

DEFAULT_CONFIG = "/etc/edge-ota/agent.toml"


def _device(args: argparse.Namespace) -> Device:
    return build_device(Path(args.config))


def _print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, sort_keys=True))


class _PhasedProgress:
    """One progress display per install phase ("writing", "verifying read-back"),
    each counting up to the image size; silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.phase: Phase | None = None
        self.bar: Progress | None = None

    def __call__(self, phase: Phase, done: int, total: int) -> None:
        if not self.enabled:
            return
        if phase is not self.phase or self.bar is None:
            self.finish()
            self.phase, self.bar = phase, Progress(phase.value)
        self.bar(done, total)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.finish()


def _install(args: argparse.Namespace) -> int:
    device = _device(args)
    try:
        stream = source_for(args.source, device.config.download).open()
    except OtaError as e:
        # No bundle byte arrived, but the attempt still failed: report it like any other.
        device.record(Event("install", "failed", str(e)))
        raise
    progress = _PhasedProgress(enabled=not args.json or sys.stderr.isatty())
    with stream:
        outcome = install(
            device, stream, progress=progress, allow_downgrade=args.allow_downgrade, reinstall=args.reinstall
        )
    progress.finish()
    already = outcome.result is InstallResult.ALREADY_INSTALLED
    if args.json:
        _print_json(
            {
                "result": outcome.result.value,
                "txn": outcome.txn,
                "bundle_version": outcome.bundle_version,
                "slot": outcome.slot,
                "security_version": outcome.security_version,
                "reason": outcome.reason,
                "reboot_to_try": not already,
            }
        )
    elif already:
        print(outcome.reason)
    else:
        print(f"installed version {outcome.bundle_version} into slot {outcome.slot}; reboot to try it")
    return 0


def _status(args: argparse.Namespace) -> int:
    doc = status(_device(args))
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


def _boot_check(args: argparse.Namespace) -> int:
    device = _device(args)
    outcome = boot_check(device)
    rebooting = outcome.reboot and not args.no_reboot
    if args.json:
        _print_json(
            {
                "outcome": outcome.outcome.value,
                "slot": outcome.slot,
                "reason": outcome.reason,
                "booted_good": outcome.booted_good,
                "reboot_needed": outcome.reboot,
                "rebooting": rebooting,
            }
        )
    else:
        print(f"boot-check: {outcome.outcome.value}: {outcome.reason}")
        if outcome.reboot and not rebooting:
            print("boot-check: reboot needed (skipped: --no-reboot)")
    if rebooting:
        sys.stdout.flush()
        reboot(device.config.reboot_command)
    # Non-zero whenever the booted slot is not good: keeps boot-complete.target
    # (and systemd-bless-boot's "good") from being reached.
    return 1 if outcome.reboot or not outcome.booted_good else 0


def _mark(args: argparse.Namespace) -> int:
    verdict = Verdict(args.command.removeprefix("mark-"))
    outcome = mark(_device(args), args.slot, verdict, force=getattr(args, "force", False))
    if args.json:
        _print_json(
            {
                "slot": outcome.slot,
                "verdict": outcome.verdict.value,
                "committed": outcome.committed,
                "committed_security_version": outcome.security_version,
                "reason": outcome.reason,
            }
        )
    elif outcome.committed:
        print(f"slot {outcome.slot}: marked good; committed (security version now {outcome.security_version})")
    else:
        print(f"slot {outcome.slot}: marked {verdict.value}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return service.run(_device(args))


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

    p = sub.add_parser("install", parents=[reporting], help="install a bundle into the inactive slot")
    p.add_argument("source", help="bundle file, - for stdin, or an http(s) URL")
    p.add_argument(
        "--allow-downgrade", action="store_true", help="accept a security version below the committed one (dangerous)"
    )
    p.add_argument(
        "--reinstall", action="store_true", help="write the bundle even when a slot already holds it (booted/pending)"
    )
    p.set_defaults(func=_install)

    p = sub.add_parser("status", parents=[reporting], help="show slots, boot state and the last result")
    p.set_defaults(func=_status)

    p = sub.add_parser("boot-check", parents=[reporting], help="after boot: commit a trial slot or roll back")
    p.add_argument("--no-reboot", action="store_true", help="report a needed reboot instead of rebooting")
    p.set_defaults(func=_boot_check)

    for verb in ("mark-good", "mark-bad"):
        p = sub.add_parser(verb, parents=[reporting], help=f"{verb.replace('-', ' ')} a slot")
        p.add_argument("slot", nargs="?", default="booted", help="booted (default), other, or a bootname")
        if verb == "mark-good":
            p.add_argument(
                "--force",
                action="store_true",
                help="mark good a slot whose content is not known complete and verified (dangerous)",
            )
        p.set_defaults(func=_mark)

    p = sub.add_parser("run", parents=[common], help="run as the device's service (systemd Type=notify, watchdog)")
    p.set_defaults(func=_run)

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
