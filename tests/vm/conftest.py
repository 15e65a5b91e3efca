"""Steps of the VM update cycle that VM_STEPS leaves out are deselected (not
skipped: under CI a skip means a missing install step)."""

from __future__ import annotations

import re

import pytest

from tests.vm.scenario import selected_steps


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    steps = selected_steps()
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        m = re.match(r"test_(\d)_", item.name)
        (drop if m and "tests/vm/" in item.nodeid and m.group(1) not in steps else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
