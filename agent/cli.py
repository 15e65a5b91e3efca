"""`ota-agent`: install, status, boot-check, mark-good/mark-bad, and the
simulated device (`sim init`, `sim boot`). `main(argv) -> int`; one line per
error (a traceback only with -v); `--json` where state is printed."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import service, sim
from agent.bootcheck import HealthOverride, boot_check
from agent.daemon import Device, build_device
from agent.events import Event
from agent.installer import install
from agent.sources import source_for
from agent.status import render, status
from bundler.format.errors import OtaError
from hw.power import reboot
from hw.tty import Progress, run_reporting_errors

DEFAULT_CONFIG = "/etc/edge-ota/agent.toml"


def _device(args: argparse.Namespace) -> Device:
    return build_device(Path(args.config))


def _install(args: argparse.Namespace) -> int:
    device = _device(args)
    try:
        stream = source_for(args.source, device.config.download).open()
    except OtaError as e:
        # No bundle byte arrived, but the attempt still failed: report it like any other.
        device.record(Event("install", "failed", str(e)))
        raise
    bar = Progress("installing")
    with stream:
        outcome = install(device, stream, progress=bar, allow_downgrade=args.allow_downgrade)
    bar.finish()
    print(f"installed version {outcome.bundle_version} into slot {outcome.slot}; reboot to try it")
    return 0


def _status(args: argparse.Namespace) -> int:
    doc = status(_device(args))
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


def _boot_check(args: argparse.Namespace) -> int:
    device = _device(args)
    outcome = boot_check(device)
    print(f"boot-check: {outcome.outcome.value}: {outcome.reason}")
    if outcome.reboot:
        if args.no_reboot:
            print("boot-check: reboot needed (skipped: --no-reboot)")
        else:
            reboot(device.config.reboot_command)
        return 1  # keeps boot-complete.target (and systemd-bless-boot's "good") from being reached
    return 0


def _resolve(device: Device, which: str) -> str:
    booted = device.bootloader.booted_slot()
    names = device.config.bootnames
    if which == "booted":
        return booted
    if which == "other":
        others = [b for b in names if b != booted]
        return others[0]
    if which not in names:
        raise OtaError(f"unknown slot {which!r}: use booted, other or one of {', '.join(names)}")
    return which


def _mark(args: argparse.Namespace) -> int:
    device = _device(args)
    slot = _resolve(device, args.slot)
    if args.command == "mark-good":
        device.bootloader.mark_good(slot)
    else:
        device.bootloader.mark_bad(slot)
    verdict = args.command.removeprefix("mark-")
    device.record(Event(args.command, "ok", f"slot {slot} marked {verdict} by operator", slot=slot))
    print(f"slot {slot}: marked {verdict}")
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
    parser = argparse.ArgumentParser(prog="ota-agent", description="edge-ota device agent")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"agent config (default {DEFAULT_CONFIG})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install", help="install a bundle into the inactive slot")
    p.add_argument("source", help="bundle file, - for stdin, or an http(s) URL")
    p.add_argument(
        "--allow-downgrade", action="store_true", help="accept a security version below the committed one (dangerous)"
    )
    p.set_defaults(func=_install)

    p = sub.add_parser("status", help="show slots, boot state and the last result")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)

    p = sub.add_parser("boot-check", help="after boot: commit a trial slot or roll back")
    p.add_argument("--no-reboot", action="store_true", help="report a needed reboot instead of rebooting")
    p.set_defaults(func=_boot_check)

    for verb in ("mark-good", "mark-bad"):
        p = sub.add_parser(verb, help=f"{verb.replace('-', ' ')} a slot")
        p.add_argument("slot", nargs="?", default="booted", help="booted (default), other, or a bootname")
        p.set_defaults(func=_mark)

    p = sub.add_parser("run", help="run as the device's service (systemd Type=notify, watchdog)")
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="ota-agent: %(message)s", force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_failures)
    return run_reporting_errors("ota-agent", lambda: int(args.func(args)), expected=(OtaError,), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
