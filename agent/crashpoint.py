"""Named crash points for power-cut tests: `crashpoint("after-mark-bad")` is a
no-op unless the environment variable EDGE_OTA_CRASHPOINT names that point, in
which case the process kills itself with SIGKILL there — the closest a test can
get to pulling the plug at an exact instruction."""

from __future__ import annotations

import os
import signal

ENV = "EDGE_OTA_CRASHPOINT"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
