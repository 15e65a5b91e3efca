"""`ota-agent bootloader init [--force]`: the configured bootloader's initial
state (every configured slot committed, the first one primary), under the state
lock so no install or boot-check runs meanwhile. The per-backend rules (what
counts as "already initialised", what --force may overwrite) are
`hw.bootloader.init`'s; this module only binds them to a device and renders
the outcome."""

from __future__ import annotations

from typing import Any

from agent.daemon import Device
from hw.bootloader.init import InitOutcome, InitResult, describe, init_env


def bootloader_init(device: Device, *, force: bool = False) -> InitOutcome:
    with device.store.lock():
        return init_outside_lock(device, force=force)


def init_outside_lock(device: Device, *, force: bool = False) -> InitOutcome:
    """For callers that already hold the state lock (provisioning)."""
    return init_env(device.bootloader.env, device.config.bootnames, force=force)


def outcome_json(o: InitOutcome) -> dict[str, Any]:
    return {
        "backend": o.backend,
        "result": o.result.value,
        "order": list(o.state.order),
        "slots": {b: o.state.slots[b].describe() for b in o.state.order},
        "last_good": o.state.last_good,
        "previous": o.previous,
    }


def outcome_text(o: InitOutcome) -> str:
    if o.result is InitResult.ALREADY:
        return f"{o.backend}: already initialised: {describe(o.state)}; nothing written"
    was = "" if o.result is InitResult.CREATED else f" (replaced {o.previous})"
    return f"{o.backend}: initialised: {describe(o.state)}{was}"
