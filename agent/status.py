"""The device's status as one document: booted and primary slot, per slot its
boot state and contents, the committed security version, the pending trial
and the last result. Read-only.

A status that cannot tell the booted slot (no `ota.slot=` on the kernel command
line, or a name the bootloader does not know) still reports everything else:
`booted` is None and `problems` says what is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from agent.daemon import Device
from hw.bootloader import model
from hw.errors import BootEnvError


def status(device: Device) -> dict[str, Any]:
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
    slots: dict[str, Any] = {}
    for bootname in cfg.bootnames:
        sb = boot.slots[bootname]
        record = state.slots.get(bootname)
        members = [s for s in cfg.slots if s.bootname == bootname]
        slots[bootname] = {
            "path": str(members[0].path),
            "paths": {s.slot_class: str(s.path) for s in members},
            "bootable": sb.bootable,
            "boot_state": sb.state.value,
            "tries_left": sb.tries_left if sb.state is model.SlotBootState.TRIAL else None,
            "version": record.version if record else None,
            "sha256": record.sha256 if record else None,
            "security_version": record.security_version if record else None,
            "installed": record.installed if record else None,
        }
    return {
        "compatible": cfg.compatible,
        "bootloader": device.bootloader.name,
        "booted": booted,
        "primary": model.next_boot(boot),
        "order": list(boot.order),
        "committed_security_version": state.committed_security_version,
        "slots": slots,
        "trial": asdict(state.trial) if state.trial else None,
        "last_result": asdict(state.last_result) if state.last_result else None,
        "problems": problems,
    }


def render(doc: dict[str, Any]) -> str:
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
    last = doc["last_result"]
    if last:
        what = f"{last['event']} {last['result']}"
        version = f" version {last['bundle_version']}" if last["bundle_version"] else ""
        lines.append(f"last        {what}{version} at {last['time']}: {last['reason']}")
    lines += [f"problem     {p}" for p in doc["problems"]]
    return "\n".join(lines)
