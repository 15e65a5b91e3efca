"""Fixtures for the reliability matrix: the power-cut harness's releases (one
signing key, small deterministic images and their bundles, built once).

The soak tests (test_soak.py) run only under `make soak` (EDGE_OTA_SOAK=1);
otherwise they are deselected, not skipped: under CI a skip means a missing
install step."""

from __future__ import annotations

import os

import pytest

from tests.powercut.conftest import releases

__all__ = ["releases"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("EDGE_OTA_SOAK") == "1":
        return
    drop = [item for item in items if "tests/reliability/test_soak.py" in item.nodeid]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]
