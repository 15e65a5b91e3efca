"""`provision`: a blank device becomes a fleet member, resumably (docs/factory.md).

Owns the order of the steps and what "done" means for each; the work of each
step is someone else's (identity.py, the installer, hw.bootloader.init):

    preflight   (writes nothing) the bundle's head, read from the stream: signature, compatible string and
                security version; a full bundle; no slot booted; slots large
                enough and not mounted; bootloader storage writable; keyring
    identity    the device key (made once, never remade), CSR, certificate
    config      the device config: the factory config plus [mqtt] (broker,
                device id, the identity as TLS client key and certificate)
    image       the bundle into every slot (`installer.install_all_slots`: every
                install check, one pass, each slot read back)
    bootloader  every slot good, the first primary; the security floor raised
                to the image's security version
    record      the provisioning record complete, a `provision` event reported

Each step is recorded durably (record.py) as soon as its effects are; a re-run
after a power cut (or SIGKILL) skips the steps recorded and redoes at most the
one that was cut, which is idempotent. The whole run holds the state lock. A
provisioned device refuses to be provisioned again unless `force` (which the
CLI spells --force and the console guards with the technician challenge); a
forced run keeps the identity.
"""

from __future__ import annotations

import os
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent import doctor, policy
from agent.crashpoint import crashpoint
from agent.daemon import Device
from agent.errors import ConfigError, InstallError
from agent.events import Event, EventType, Result, iso
from agent.installer import install_all_slots, refuse_delta
from agent.provision import identity, record
from agent.provision.boot import init_outside_lock
from agent.sources import BundleSource, source_for
from bundler.format.reader import BundleReader
from bundler.format.signing import VerifiedBundle, verify
from hw.bootloader.init import Found, init_env, probe
from ota_common.errors import OtaError
from ota_common.fsutil import atomic_write, read_regular
from ota_common.text import clean

MARK = "# --- written by ota-agent provision (docs/factory.md): everything below is replaced on a re-run ---"
WAITING = "waiting-for-image"
PREFLIGHT = (doctor.check_slot_marker, doctor.check_env_writable, doctor.check_slots, doctor.check_keyring)

StepProgress = Callable[[str, int, int], None]  # (phase, done, total)


class ProvisionError(InstallError):
    """Provisioning refused or cannot continue; nothing the message does not name was changed."""


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    bundle: str | None = None  # None: only when a previous run wrote the image already
    device_id: str | None = None
    cert: str | None = None  # PEM text or a path: the device certificate the factory CA signed
    ca_cert: str | None = None  # PEM text or a path: the factory CA certificate
    broker: str | None = None  # overrides [provision] broker
    force: bool = False


@dataclass(frozen=True, slots=True)
class ProvisionOutcome:
    ident: identity.Identity
    bundle_version: str | None  # None: no bundle was given yet (the outcome waits for the image)
    image_sha256: str | None
    security_version: int | None
    ran: tuple[str, ...]  # steps this run did
    skipped: tuple[str, ...]  # steps a previous run had recorded
    device_config: Path
    record_path: Path

    @property
    def waiting(self) -> bool:
        return self.image_sha256 is None

    def to_json(self) -> dict[str, Any]:
        return {**self.ident.to_json(), "bundle_version": self.bundle_version, "image_sha256": self.image_sha256,
                "security_version": self.security_version, "steps_run": list(self.ran),
                "steps_skipped": list(self.skipped), "device_config": str(self.device_config),
                "record": str(self.record_path), "result": WAITING if self.waiting else "provisioned"}

    def text(self) -> str:
        resumed = f" (resumed: {', '.join(self.skipped)} already done)" if self.skipped else ""
        if self.waiting:
            return (f"identity and config ready: {self.ident.text()}\n"
                    "the image is next: install a full bundle (ota-console put, or provision --bundle)")
        return (f"provisioned: {self.ident.text()}\n"
                f"image {self.bundle_version} ({str(self.image_sha256)[:16]}...) in every slot; "
                f"config {self.device_config}{resumed}")


def provision(device: Device, req: ProvisionRequest, *, source: BundleSource | None = None,
              progress: StepProgress | None = None, txn: str | None = None) -> ProvisionOutcome:
    """`source`: the bundle as a stream a front end made (a console upload); by
    default `req.bundle` (a file, `-`, or a URL). The stream is read once, front to
    back: its head is checked before the first step, its payload is the image step."""
    txn = txn or uuid.uuid4().hex[:12]
    quiet: StepProgress = lambda phase, done, total: None  # noqa: E731
    with device.store.lock():
        try:
            if source is None and req.bundle is None:
                return _provision(device, req, None, progress or quiet, txn)
            src = source or source_for(str(req.bundle), device.config.download)
            with src.open() as stream:
                return _provision(device, req, BundleReader(stream), progress or quiet, txn)
        except OtaError as e:
            device.events.emit(Event(event=EventType.PROVISION, result=Result.FAILED, reason=str(e), txn=txn))
            raise


@dataclass(frozen=True, slots=True)
class ImageFacts:
    version: str
    sha256: str
    security_version: int


def _provision(device: Device, req: ProvisionRequest, reader: BundleReader | None, progress: StepProgress,
               txn: str) -> ProvisionOutcome:
    pcfg = device.config.provision
    directory = pcfg.dir
    try:
        rec = record.load(directory)
    except record.RecordError:
        if not req.force:
            raise
        rec = record.Record(steps={"identity": "kept"} if (directory / identity.KEY_FILE).exists() else {})
    if rec.complete:
        if not req.force:
            raise ProvisionError(
                f"already provisioned as device {rec.info.get('device_id')} at {rec.info.get('provisioned')} "
                f"(image {rec.info.get('bundle_version')}); re-provisioning needs --force (the identity is kept)"
            )
        rec = rec.restarted()
    head = _preflight(device, reader)
    image: ImageFacts | None = None
    if head is not None:
        m = head.manifest
        image = ImageFacts(m.bundle_version, m.images[0].sha256, m.security_version)
    elif rec.done("image"):  # the slots hold it already: a re-run needs no bundle
        info = rec.info
        image = ImageFacts(str(info["bundle_version"]), str(info["image_sha256"]), int(info["security_version"]))
    skipped = tuple(s for s in record.STEPS if rec.done(s))
    ran: list[str] = []
    rec = replace(rec, runs=rec.runs + 1)
    total = len(record.STEPS)

    def step_done(name: str, **info: Any) -> None:
        nonlocal rec
        rec = rec.with_step(name, iso(device.clock()), **info)
        record.save(directory, rec)
        ran.append(name)
        progress(f"provision: {name} done", record.STEPS.index(name) + 1, total)
        crashpoint(f"provision-after-{name}")

    # identity: every run loads it (the outcome reports it); only a missing piece is made.
    progress("provision: identity", 0, total)
    rec = pin_device_id(directory, rec, req.device_id)
    ident = identity.ensure_identity(
        directory, key_type=pcfg.key_type, device_id=req.device_id, known_id=rec.info.get("device_id"),
        cert=req.cert, ca_cert=req.ca_cert, now=device.clock(),
    )
    if not rec.done("identity") or req.cert is not None:
        step_done("identity", device_id=ident.device_id, public_key_sha256=ident.fingerprint,
                  key_type=ident.key_type)
    if not rec.done("config") or req.cert is not None or req.broker is not None:
        write_device_config(device, ident, broker=req.broker or pcfg.broker)
        step_done("config", device_config=str(pcfg.device_config))
    if image is None:  # no bundle yet: identity and config are done, the image comes by `install`
        return ProvisionOutcome(ident, None, None, None, tuple(ran), skipped, pcfg.device_config,
                                record.path_of(directory))
    if not (rec.done("image") and rec.info.get("image_sha256") == image.sha256):
        if reader is None or head is None:
            raise ProvisionError("the slots hold another image than the record names: provisioning needs the bundle")
        _ensure_bootloader_state(device)
        install_all_slots(device, reader, bundle=head, txn=txn,
                          progress=lambda phase, done, all_: progress(f"provision: image {phase.value}", done, all_))
        step_done("image", bundle_version=image.version, image_sha256=image.sha256,
                  security_version=image.security_version)
    if not rec.done("bootloader"):
        init_outside_lock(device, force=True)
        state = device.store.load()
        if state.committed_security_version < image.security_version:
            device.store.save(replace(state, committed_security_version=image.security_version))
        step_done("bootloader")
    if not rec.done("record"):
        reason = f"provisioned as device {ident.device_id} with image {image.version} in every slot"
        device.record(Event(event=EventType.PROVISION, result=Result.OK, reason=reason, txn=txn,
                            bundle_version=image.version))
        rec = replace(rec, info={**rec.info, "provisioned": iso(device.clock())})
        step_done("record")
    return ProvisionOutcome(ident, image.version, image.sha256, image.security_version, tuple(ran), skipped,
                            pcfg.device_config, record.path_of(directory))


@dataclass(frozen=True, slots=True)
class ProvisionStatus:
    """What a station asks before it writes anything: the board, and how far it is."""

    compatible: str
    bootnames: tuple[str, ...]
    record: record.Record | None  # None: unreadable (damaged); see `problem`
    problem: str = ""

    def to_json(self) -> dict[str, Any]:
        rec = self.record
        info = rec.info if rec else {}
        return {"compatible": self.compatible, "slots": list(self.bootnames),
                "complete": bool(rec and rec.complete), "steps": sorted(rec.steps) if rec else [],
                "waiting_for_image": bool(rec and rec.done("identity") and rec.done("config")
                                          and not rec.done("image")),
                **{k: info.get(k) for k in record.FIELDS}, "problem": self.problem or None}

    def text(self) -> str:
        doc = self.to_json()
        if doc["complete"]:
            return (f"provisioned as device {doc['device_id']} at {doc['provisioned']} "
                    f"(image {doc['bundle_version']})")
        if self.problem:
            return f"not provisioned: {self.problem}"
        done = ", ".join(doc["steps"]) or "nothing"
        return f"not provisioned ({self.compatible}); done so far: {done}"


def provision_status(device: Device) -> ProvisionStatus:
    cfg = device.config
    try:
        rec: record.Record | None = record.load(cfg.provision.dir)
    except record.RecordError as e:
        return ProvisionStatus(cfg.compatible, cfg.bootnames, None, str(e))
    return ProvisionStatus(cfg.compatible, cfg.bootnames, rec)


def waits_for_image(device: Device) -> bool:
    """A provisioning that wrote identity and config and waits for its bundle: then an
    `install` on this device (which runs no slot) continues it (`App.install`)."""
    try:
        rec = record.load(device.config.provision.dir)
    except record.RecordError:
        return False
    return rec.done("identity") and rec.done("config") and not rec.done("image")


def pin_device_id(directory: Path, rec: record.Record, device_id: str | None) -> record.Record:
    """Record the asked-for device id before a key exists: a run cut after the key is
    made resumes with the same id even when the re-run does not name it."""
    known = rec.info.get("device_id")
    if device_id is None or known is not None:
        return rec
    rec = replace(rec, info={**rec.info, "device_id": identity.check_device_id(device_id)})
    record.save(directory, rec)
    return rec


def _preflight(device: Device, reader: BundleReader | None) -> VerifiedBundle | None:
    """Everything that can refuse the run, checked before anything is written."""
    head = None
    if reader is not None:
        head = verify(reader.read_head(), device.keyring())
        policy.check(head, compatible=device.config.compatible,
                     security_floor=device.store.load().committed_security_version, now=device.clock())
        refuse_delta(head)
    report = doctor.doctor(device, bundle=head, factory=True, checks=PREFLIGHT)
    if not report.ok:
        problems = "; ".join(f"{c.name}: {c.detail}" for c in report.failed())
        raise ProvisionError(f"not ready to provision: {problems}")
    return head


def _ensure_bootloader_state(device: Device) -> None:
    """The installer marks every slot bad before writing, so a state must exist: on a
    device not yet provisioned whatever is there (nothing, or leftovers) is replaced."""
    env = device.bootloader.env
    if probe(env).found is not Found.VALID:
        init_env(env, device.config.bootnames, force=True)


# --- the device config -----------------------------------------------------------


def render_device_config(factory_text: str, ident: identity.Identity, *, broker: str | None,
                         directory: Path) -> str:
    base = factory_text.split(MARK, 1)[0].rstrip("\n") + "\n"
    try:
        doc = tomllib.loads(base)
    except tomllib.TOMLDecodeError as e:
        raise ProvisionError(f"the factory config is not valid TOML: {e}") from None
    if "mqtt" in doc:
        raise ProvisionError("the factory config already has an [mqtt] table; provisioning writes it "
                             "(move broker settings to [provision] broker)")
    lines = [MARK, f"# device {ident.device_id}, {ident.key_type} key SHA-256 {ident.fingerprint}"]
    if broker is not None:
        lines += ["[mqtt]", f"broker = {_toml_str(broker)}", f"device_id = {_toml_str(ident.device_id)}"]
        if ident.certificate:
            lines += [f"cert = {_toml_str(str(directory / identity.CERT_FILE))}",
                      f"key = {_toml_str(str(directory / identity.KEY_FILE))}"]
    return base + "\n" + "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in escaped):
        raise ProvisionError(f"{clean(value, 80)!r} holds a control character")
    return f'"{escaped}"'


def write_device_config(device: Device, ident: identity.Identity, *, broker: str | None) -> None:
    pcfg = device.config.provision
    try:
        factory_text = read_regular(device.config.path, config_mod.MAX_CONFIG + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProvisionError(f"cannot read the factory config {device.config.path}: {e}") from None
    text = render_device_config(factory_text, ident, broker=broker, directory=pcfg.dir.resolve())
    target = pcfg.device_config
    check = target.with_name(f".{target.name}.check")
    try:
        atomic_write(check, text.encode(), mode=0o644)
        try:
            config_mod.load(check)  # the device config must load where it will live (relative paths)
        finally:
            os.unlink(check)
        atomic_write(target, text.encode(), mode=0o644)
    except ConfigError as e:
        raise ProvisionError(f"the device config would not load: {e}") from None
    except OSError as e:
        raise ProvisionError(f"cannot write the device config {target}: {e.strerror}") from None
