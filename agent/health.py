"""Health checks after a trial boot: configured commands and systemd units,
each retried until it passes or the shared deadline runs out.

Owns running the checks and timing them out; does not decide what to do with
the result (boot-check does). `on_progress` is called each time a check
passes — the boot-check uses it to feed the watchdog only while the system
is making progress toward commit.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.config import HealthConfig

log = logging.getLogger(__name__)

RETRY_INTERVAL = 2.0
OUTPUT_LIMIT = 200


@dataclass(frozen=True, slots=True)
class HealthResult:
    ok: bool
    reason: str


class HealthChecker(Protocol):
    def __call__(self, cfg: HealthConfig) -> HealthResult: ...


def checks_of(cfg: HealthConfig) -> list[tuple[str, ...]]:
    return [*cfg.commands, *(("systemctl", "is-active", "--quiet", unit) for unit in cfg.units)]


def run_checks(
    cfg: HealthConfig,
    *,
    on_progress: Callable[[], None] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthResult:
    deadline = monotonic() + cfg.deadline
    checks = checks_of(cfg)
    for command in checks:
        name = f"health check `{' '.join(command)}`"
        last = ""
        while True:
            remaining = deadline - monotonic()
            if remaining <= 0:
                return HealthResult(False, f"{name} did not pass within {cfg.deadline:g}s{last}")
            try:
                proc = subprocess.run(command, capture_output=True, timeout=remaining, check=False)
            except subprocess.TimeoutExpired:
                return HealthResult(False, f"{name} still running at the {cfg.deadline:g}s deadline")
            except OSError as e:
                return HealthResult(False, f"{name} cannot run: {e.strerror}")
            if proc.returncode == 0:
                log.info("health check passed: %s", " ".join(command))
                if on_progress:
                    on_progress()
                break
            output = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()[:OUTPUT_LIMIT]
            last = f" (last: exit {proc.returncode}{': ' + output if output else ''})"
            sleep(min(RETRY_INTERVAL, max(deadline - monotonic(), 0)))
    return HealthResult(True, f"{len(checks)} health check(s) passed" if checks else "no health checks configured")
