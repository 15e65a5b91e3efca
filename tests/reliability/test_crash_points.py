"""Every named crash point of every flow (`tests.reliability.crashpoints.POINTS`),
each as a process kill and as a power cut with unsynced writes dropped: the
device boots a good slot, tells the truth, loses no acknowledged report, and
the next update works. Representative backends here (sim; U-Boot's redundant
env for the install flow); `make soak` runs every backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.powercut.conftest import Releases
from tests.reliability.crashpoints import POINTS, Point, run_point
from tests.reliability.results import record

BACKENDS = os.environ.get("EDGE_OTA_CRASH_BACKENDS", "").split() or None


def _cases() -> list[tuple[Point, str]]:
    cases = []
    for p in POINTS:
        if BACKENDS is not None:
            only = {"provision": ("sim", "uboot"), "outbox": ("sim",), "mqtt": ("sim",),
                    "etc-merge": ("sim",)}.get(p.flow)
            backends = [b for b in BACKENDS if only is None or b in only]
        else:
            backends = ["uboot" if p.flow == "install" and p.name in ("after-mark-bad", "after-set-primary")
                        else "sim"]
        cases += [(p, b) for b in backends]
    return cases


@pytest.mark.parametrize(("point", "backend"), _cases(), ids=lambda v: v.id if isinstance(v, Point) else v)
def test_a_crash_at_every_named_point_recovers_as_a_kill_and_as_a_power_cut(
    tmp_path: Path, releases: Releases, point: Point, backend: str
) -> None:
    result = run_point(tmp_path, releases, point, backend)
    record("crash point", f"{point.id}@{backend}", passed=result.unrecovered == 0, unrecovered=result.unrecovered,
           phase=point.phase, kills=1, power_cut_trees=result.cut_states)
    assert not result.kill, f"after the kill at {point.id}: " + "; ".join(result.kill[:10])
    assert not result.cut, f"after a power cut at {point.id}: " + "; ".join(result.cut[:10])
