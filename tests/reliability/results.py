"""Where the reliability tests put their counts for `make reliability`: one JSON
line per case (category, name, passed, unrecovered, and counts such as states
checked), appended to the file named by EDGE_OTA_RELIABILITY_LOG. Without that
variable nothing is written (plain `pytest` runs)."""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "EDGE_OTA_RELIABILITY_LOG"


def record(category: str, name: str, *, passed: bool, unrecovered: int = 0, **counts: Any) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"category": category, "name": name, "passed": passed, "unrecovered": unrecovered, **counts},
                      sort_keys=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
