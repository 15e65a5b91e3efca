"""The one command table every front end adapts: the CLI, the local API socket,
MQTT jobs and the serial console.

A `Command` has a name, typed parameters, whether it changes state, whether it
is allowed while a job runs, the action it calls (`agent.actions.App`), and the
two renderings of its result: one JSON form (the wire schema, shared by every
front end) and one text form (for people). `execute()` validates arguments
(unknown names, types, bounded strings: arguments are untrusted when they came
over a socket or a broker), runs state-changing commands as jobs of the shared
queue (a second one while a job runs is a `BusyError`) and read-only ones at once.

Front ends own only parsing their wire format and printing a `Reply`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent import doctor as doctor_mod
from agent.actions import App, BootCheckResult, RebootOutcome, RollbackOutcome
from agent.installer import InstallOutcome, InstallResult
from agent.jobs import JobContext, JobState, JobView
from agent.marking import MarkOutcome, Verdict
from agent.media.job import MediaOutcome
from agent.provision import boot as provision_boot
from agent.provision.identity import Identity
from agent.provision.run import ProvisionOutcome, ProvisionRequest, ProvisionStatus, provision_status
from agent.status import DeviceStatus
from ota_common.errors import OtaError
from ota_common.text import clean

MAX_ARG = 4096


class CommandError(OtaError):
    """A command or its arguments are not what the table says."""


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: type  # str, bool or int
    required: bool = False
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    max_len: int = MAX_ARG  # strings: what the front end's own message bound does not already cap
    option: bool = False  # the CLI spells it --name VALUE (not a positional argument)


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    params: tuple[Param, ...]
    changes_state: bool
    while_busy: bool  # allowed while a job runs (read-only commands and cancel)
    run: Callable[[App, Mapping[str, Any], JobContext | None], Any]
    to_json: Callable[[Any], dict[str, Any]]
    text: Callable[[Any], str]
    ok: Callable[[Any], bool] = field(default=lambda result: True)  # e.g. boot-check: is the booted slot good


@dataclass(frozen=True, slots=True)
class Reply:
    command: str
    ok: bool
    result: dict[str, Any] | None = None
    text: str = ""
    job: JobView | None = None
    error: str | None = None
    error_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"command": self.command, "ok": self.ok}
        if self.job is not None:
            doc["job"] = {"id": self.job.id, "state": self.job.state.value, "origin": self.job.origin}
        if self.error is not None:
            doc["error"] = {"type": self.error_type, "message": self.error}
        else:
            doc["result"] = self.result
        return doc


# --- results to JSON and text -------------------------------------------------


def _install_json(o: InstallOutcome) -> dict[str, Any]:
    already = o.result is InstallResult.ALREADY_INSTALLED
    return {"result": o.result.value, "txn": o.txn, "bundle_version": o.bundle_version, "slot": o.slot,
            "security_version": o.security_version, "reason": o.reason, "reboot_to_try": not already,
            "downloaded": o.downloaded, "conflicts": [c.to_json() for c in o.etc_conflicts]}


def _install_text(o: InstallOutcome) -> str:
    if o.result is InstallResult.ALREADY_INSTALLED:
        return o.reason
    return f"installed version {o.bundle_version} into slot {o.slot}; reboot to try it"


def _mark_json(o: MarkOutcome) -> dict[str, Any]:
    return {"slot": o.slot, "verdict": o.verdict.value, "committed": o.committed,
            "committed_security_version": o.security_version, "reason": o.reason}


def _mark_text(o: MarkOutcome) -> str:
    if o.committed:
        return f"slot {o.slot}: marked good; committed (security version now {o.security_version})"
    return f"slot {o.slot}: marked {o.verdict.value}"


def _job_json(v: JobView) -> dict[str, Any]:
    return v.to_json()


def _job_text(v: JobView) -> str:
    return f"job {v.id} ({v.command}): {v.state.value}"


def _bool_arg(args: Mapping[str, Any], name: str) -> bool:
    return bool(args.get(name, False))


def _run_install(app: App, a: Mapping[str, Any], ctx: JobContext | None) -> InstallOutcome:
    assert ctx is not None
    return app.install(ctx, a["source"], allow_downgrade=_bool_arg(a, "allow_downgrade"),
                       reinstall=_bool_arg(a, "reinstall"))


def _run_mark(verdict: Verdict) -> Callable[[App, Mapping[str, Any], JobContext | None], MarkOutcome]:
    def run(app: App, a: Mapping[str, Any], ctx: JobContext | None) -> MarkOutcome:
        assert ctx is not None
        return app.mark(ctx, a["slot"], verdict, force=_bool_arg(a, "force"))

    return run


def _run_cancel(app: App, a: Mapping[str, Any], ctx: JobContext | None) -> JobView:
    return app.cancel(a.get("job"))


def _run_job(app: App, a: Mapping[str, Any], ctx: JobContext | None) -> JobView:
    view = app.job(a["job"])
    if view is None:
        raise CommandError(f"no job {clean(a['job'], 64)!r} is known (running or recent)")
    return view


def _opt(a: Mapping[str, Any], name: str) -> str | None:
    value = a.get(name)
    return value if isinstance(value, str) and value else None


def _run_provision(app: App, a: Mapping[str, Any], ctx: JobContext | None) -> ProvisionOutcome:
    request = ProvisionRequest(bundle=_opt(a, "bundle"), device_id=_opt(a, "device_id"), cert=_opt(a, "cert"),
                               ca_cert=_opt(a, "ca_cert"), broker=_opt(a, "broker"), force=_bool_arg(a, "force"))
    return app.provision(_need(ctx), request)


def _run_identity(app: App, a: Mapping[str, Any], ctx: JobContext | None) -> Identity:
    return app.identity(_need(ctx), device_id=_opt(a, "device_id"), cert=_opt(a, "cert"), ca_cert=_opt(a, "ca_cert"))


_DEVICE_ID = Param("device_id", str, help="the device's id (default: from its public key)", option=True, max_len=64)
_CERT = Param("cert", str, help="device certificate from the factory CA (PEM file, or PEM text)", option=True,
              max_len=32 * 1024)
_CA_CERT = Param("ca_cert", str, help="the factory CA certificate the device certificate must chain to",
                 option=True, max_len=32 * 1024)


def _run_doctor(app: App, a: Mapping[str, Any], ctx: JobContext | None) -> doctor_mod.DoctorReport:
    bundle = doctor_mod.bundle_head(app.device, a["bundle"]) if a.get("bundle") else None
    return doctor_mod.doctor(app.device, bundle=bundle)


_SLOT = Param("slot", str, default="booted", help="booted (default), other, or a bootname")
_FORCE = Param("force", bool, default=False, help="mark good although the slot's content is not known complete")
_FORCE_BAD = Param("force", bool, default=False, help="mark the booted slot bad although no other slot can boot")

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "status", "show slots, boot state, the last result and the running job", (), False, True,
            lambda app, a, ctx: app.status(), DeviceStatus.to_json, DeviceStatus.render,
        ),
        Command(
            "install", "install a bundle into the inactive slot",
            (
                # The source itself judges its text (and records a refusal): only a sanity bound here.
                Param("source", str, required=True, help="bundle file, - for stdin, or an http(s) URL",
                      max_len=4 << 20),
                Param("allow_downgrade", bool, default=False, help="accept a security version below the floor"),
                Param("reinstall", bool, default=False, help="write the bundle although a slot already holds it"),
            ),
            True, False, _run_install, _install_json, _install_text,
        ),
        Command(
            "media", "install the newest bundle for this device from a USB stick (or a mounted directory)",
            (Param("path", str, required=True, help="block device (mounted read-only) or mounted directory"),),
            True, False, lambda app, a, ctx: app.media(_need(ctx), a["path"]), MediaOutcome.to_json,
            MediaOutcome.text,
        ),
        Command("mark-good", "mark a slot good (of the booted slot on trial: commit it)", (_SLOT, _FORCE), True,
                False, _run_mark(Verdict.GOOD), _mark_json, _mark_text),
        Command("mark-bad", "mark a slot bad", (_SLOT, _FORCE_BAD), True, False, _run_mark(Verdict.BAD),
                _mark_json, _mark_text),
        Command(
            "rollback", "try the other slot (content known, not bad) on the next boot",
            (
                Param("reboot", bool, default=True, help="reboot at once (default)"),
                Param("allow_downgrade", bool, default=False, help="accept a slot below the security floor"),
            ),
            True, False,
            lambda app, a, ctx: app.rollback(_need(ctx), reboot=bool(a.get("reboot", True)),
                                             allow_downgrade=_bool_arg(a, "allow_downgrade")),
            RollbackOutcome.to_json, lambda o: o.reason,
        ),
        Command("reboot", "reboot the device", (), True, False, lambda app, a, ctx: app.reboot(_need(ctx)),
                RebootOutcome.to_json, lambda o: o.reason),
        Command("boot-check", "after boot: commit a trial slot or roll back",
                (Param("reboot", bool, default=True, help="reboot when the trial failed (default)"),), True, False,
                lambda app, a, ctx: app.boot_check(_need(ctx), reboot=bool(a.get("reboot", True))),
                BootCheckResult.to_json, BootCheckResult.text, ok=lambda r: bool(r.ok)),
        Command("bootloader-init", "initialise the bootloader: every slot good, the first one primary",
                (Param("force", bool, default=False, help="overwrite a valid or damaged state"),), True, False,
                lambda app, a, ctx: provision_boot.bootloader_init(app.device, force=_bool_arg(a, "force")),
                provision_boot.outcome_json, provision_boot.outcome_text),
        Command("doctor", "check what a bring-up needs, one line per check with the fix",
                (Param("bundle", str, help="also check the slots hold this bundle's images", option=True),), False,
                True, _run_doctor, doctor_mod.DoctorReport.to_json, doctor_mod.DoctorReport.render,
                ok=lambda r: bool(r.ok)),
        Command("identity", "the device identity: key (made on the device if missing), CSR, certificate",
                (_DEVICE_ID, _CERT, _CA_CERT), True, False, _run_identity, Identity.to_json, Identity.text),
        Command(
            "provision", "factory provisioning: identity, config, the image into every slot, bootloader, record",
            (
                Param("bundle", str, help="full bundle file, - or URL (not needed once the image is written)",
                      option=True, max_len=4096),
                _DEVICE_ID, _CERT, _CA_CERT,
                Param("broker", str, help="mqtt[s]://host:port for the device config (default [provision] broker)",
                      option=True, max_len=512),
                Param("force", bool, default=False, help="provision a provisioned device again (the identity stays)"),
            ),
            True, False, _run_provision, ProvisionOutcome.to_json, ProvisionOutcome.text,
        ),
        Command("provision-status", "how far provisioning got (the board's compatible string, the steps done)",
                (), False, True, lambda app, a, ctx: provision_status(app.device), ProvisionStatus.to_json,
                ProvisionStatus.text),
        Command("cancel", "ask the running job to stop at its next safe point",
                (Param("job", str, help="job id (default: the running one)"),), False, True, _run_cancel,
                _job_json, _job_text),
        Command("job", "show a running or recent job", (Param("job", str, required=True, help="job id"),), False,
                True, _run_job, _job_json, _job_text),
    )
}


def _need(ctx: JobContext | None) -> JobContext:
    assert ctx is not None, "a state-changing command runs inside a job"
    return ctx


def check_args(command: Command, args: Mapping[str, Any]) -> dict[str, Any]:
    """Validated arguments with defaults filled in; CommandError names the bad one."""
    if not isinstance(args, Mapping):
        raise CommandError(f"{command.name}: arguments must be an object")
    known = {p.name: p for p in command.params}
    unknown = sorted(str(k) for k in args if k not in known)
    if unknown:
        names = ", ".join(known) or "none"
        raise CommandError(f"{command.name}: unknown argument {clean(unknown[0], 64)!r} (known: {names})")
    out: dict[str, Any] = {}
    for p in command.params:
        value = args.get(p.name, None)
        if value is None:
            if p.required:
                raise CommandError(f"{command.name}: argument {p.name!r} is required")
            out[p.name] = p.default
            continue
        if p.type is bool and not isinstance(value, bool):
            raise CommandError(f"{command.name}: argument {p.name!r} must be true or false")
        if p.type is str and (not isinstance(value, str) or len(value) > p.max_len):
            raise CommandError(f"{command.name}: argument {p.name!r} must be a string of at most "
                               f"{p.max_len} characters")
        if p.type is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise CommandError(f"{command.name}: argument {p.name!r} must be an integer")
        if p.choices and value not in p.choices:
            raise CommandError(f"{command.name}: argument {p.name!r} must be one of {', '.join(p.choices)}")
        out[p.name] = value
    return out


def lookup(name: object) -> Command:
    command = COMMANDS.get(name) if isinstance(name, str) else None
    if command is None:
        raise CommandError(f"unknown command {clean(name, 64)!r} (known: {', '.join(COMMANDS)})")
    return command


def execute(
    app: App, name: object, args: Mapping[str, Any], *, origin: str, job_id: str | None = None, wait: bool = True
) -> Reply:
    """Run one command. A state-changing one becomes a job: run here when `wait`
    (the reply carries its result), else started on a worker thread (the reply
    carries the queued job; follow it with the queue's listeners)."""
    command = lookup(name)
    checked = check_args(command, args)
    if not command.changes_state:
        result = command.run(app, checked, None)
        return Reply(command.name, command.ok(result), command.to_json(result), command.text(result))

    def work(ctx: JobContext) -> Any:
        return command.run(app, checked, ctx)

    if not wait:
        view = app.queue.submit(command.name, work, origin=origin, job_id=job_id)
        return Reply(command.name, True, None, f"job {view.id} queued", job=view)
    view = app.queue.run_inline(command.name, work, origin=origin, job_id=job_id)
    return reply_of(command, view)


def reply_of(command: Command, view: JobView) -> Reply:
    """The reply for a finished job."""
    if view.state is JobState.SUCCEEDED:
        return Reply(command.name, command.ok(view.result), command.to_json(view.result),
                     command.text(view.result), job=view)
    return Reply(command.name, False, None, view.error or view.state.value, job=view, error=view.error,
                 error_type=view.error_type)
