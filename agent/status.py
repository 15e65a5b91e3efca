"""The device's status as one typed value: booted and primary slot, per slot its
boot state and contents, the committed security version, the pending trial, the
last result, the running job and any problems. Read-only.

`DeviceStatus.to_json()` is the one JSON form, shared by `ota-agent status
--json`, the local API, the retained MQTT status topic and the console;
`render()` is the text form for people.

A status that cannot tell the booted slot (no `ota.slot=` on the kernel command
line, or a name the bootloader does not know) still reports everything else:
`booted` is None and `problems` says what is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agent.daemon import Device
from agent.events import Event
from agent.state import Trial
from hw.bootloader import model
from hw.errors import BootEnvError


@dataclass(frozen=True, slots=True)
class SlotStatus:
    bootname: str
    paths: dict[str, str]  # slot class -> path
    bootable: bool
    boot_state: model.SlotBootState
    tries_left: int | None  # on trial only
    version: str | None
    sha256: str | None
    security_version: int | None
    installed: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": next(iter(self.paths.values())),
            "paths": self.paths,
            "bootable": self.bootable,
            "boot_state": self.boot_state.value,
            "tries_left": self.tries_left,
            "version": self.version,
            "sha256": self.sha256,
            "security_version": self.security_version,
            "installed": self.installed,
        }


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    compatible: str
    bootloader: str
    booted: str | None
    primary: str
    order: tuple[str, ...]
    committed_security_version: int
    slots: tuple[SlotStatus, ...]
    trial: Trial | None
    last_result: Event | None
    problems: tuple[str, ...]
    job: dict[str, Any] | None = None  # the running job (JobView.to_json()), when the daemon runs one

    def slot(self, bootname: str) -> SlotStatus:
        return next(s for s in self.slots if s.bootname == bootname)

    def to_json(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible,
            "bootloader": self.bootloader,
            "booted": self.booted,
            "primary": self.primary,
            "order": list(self.order),
            "committed_security_version": self.committed_security_version,
            "slots": {s.bootname: s.to_json() for s in self.slots},
            "trial": asdict(self.trial) if self.trial else None,
            "last_result": self.last_result.to_json() if self.last_result else None,
            "problems": list(self.problems),
            "job": self.job,
        }

    def render(self) -> str:
        return render(self.to_json())


def status(device: Device) -> DeviceStatus:
    cfg = device.config
    boot = device.bootloader.state()
    state = device.store.load()
    problems: list[str] = []
    booted: str | None
    try:
        booted = device.bootloader.booted_slot()
    except BootEnvError as e:
        booted = None
        problems.append(
            f"booted slot unknown: {e}; the boot script must put ota.slot=<bootname> "
            f"(one of {', '.join(cfg.bootnames)}) on the kernel command line"
        )
    slots = []
    for bootname in cfg.bootnames:
        sb = boot.slots[bootname]
        record = state.slots.get(bootname)
        slots.append(
            SlotStatus(
                bootname=bootname,
                paths={s.slot_class: str(s.path) for s in cfg.slots if s.bootname == bootname},
                bootable=sb.bootable,
                boot_state=sb.state,
                tries_left=sb.tries_left if sb.state is model.SlotBootState.TRIAL else None,
                version=record.version if record else None,
                sha256=record.sha256 if record else None,
                security_version=record.security_version if record else None,
                installed=record.installed if record else None,
            )
        )
    return DeviceStatus(
        compatible=cfg.compatible,
        bootloader=device.bootloader.name,
        booted=booted,
        primary=model.next_boot(boot),
        order=tuple(boot.order),
        committed_security_version=state.committed_security_version,
        slots=tuple(slots),
        trial=state.trial,
        last_result=state.last_result,
        problems=tuple(problems),
    )


def render(doc: dict[str, Any]) -> str:
    """The text form of a status document (`DeviceStatus.to_json()`)."""
    lines = [
        f"compatible  {doc['compatible']}  (bootloader: {doc['bootloader']})",
        f"booted      {doc['booted'] or 'unknown (see problem below)'}",
        f"primary     {doc['primary']}  (next boot)",
        f"security    committed security version {doc['committed_security_version']}",
    ]
    for name, s in doc["slots"].items():
        mark = "*" if name == doc["booted"] else " "
        boot = s["boot_state"] + (f", {s['tries_left']} tries left" if s["tries_left"] is not None else "")
        version = s["version"] or "(unknown)"
        digest = (s["sha256"] or "")[:12]
        lines.append(f"slot {name}{mark}     {version:<14} {boot:<24} {digest}  {s['path']}")
    job = doc.get("job")
    if job:
        progress = job.get("progress") or {}
        how_far = f": {progress['phase']} {progress['percent']:.0f}%" if progress else ""
        lines.append(f"job         {job['id']} ({job['command']}) {job['state']}{how_far}")
    last = doc["last_result"]
    if last:
        what = f"{last['event']} {last['result']}"
        version = f" version {last['bundle_version']}" if last["bundle_version"] else ""
        lines.append(f"last        {what}{version} at {last['time']}: {last['reason']}")
        for c in last.get("conflicts") or ():
            lines.append(f"/etc        {c['path']}: {c['kind']}, {c['outcome']} ({c['detail']})")
    lines += [f"problem     {p}" for p in doc["problems"]]
    return "\n".join(lines)
