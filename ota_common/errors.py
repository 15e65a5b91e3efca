"""The root of every error edge-ota raises on purpose. Each package draws its own
subtree in its errors module: bundler/format/errors.py (format and trust),
agent/errors.py (config, policy, plan, sources, install, jobs), hw/errors.py
(bootloader environments, slots, watchdog)."""

from __future__ import annotations

from ota_common.text import ERROR_LIMIT, clean


class OtaError(Exception):
    """Root of all deliberate edge-ota errors. The message is made one bounded line
    here (`text.clean`), so no subclass can carry a foreign value's newlines,
    control characters or megabytes into a log, a terminal or the state."""

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (clean(args[0], ERROR_LIMIT), *args[1:])
        super().__init__(*args)
