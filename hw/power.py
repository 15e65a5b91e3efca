"""Rebooting the device: runs the configured command (default `systemctl
reboot`). The simulator does not use this: it performs the reboot itself."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from hw.errors import HwError


def reboot(command: Sequence[str]) -> None:
    if not command:
        raise HwError("reboot: no reboot_command configured")
    try:
        subprocess.run(list(command), check=True, timeout=60, capture_output=True)
    except subprocess.CalledProcessError as e:
        detail = e.stderr.decode("utf-8", "replace").strip()[:200]
        raise HwError(f"reboot: `{' '.join(command)}` exited {e.returncode}: {detail}") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HwError(f"reboot: `{' '.join(command)}` failed: {e}") from None
