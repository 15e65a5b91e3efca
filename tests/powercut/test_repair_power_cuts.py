"""Setting damaged state aside, under power cuts at every traced op: a garbage
security-floor file and outbox.log are renamed out of the way
(`storefile.set_aside`: rename, then fsync of the directory) and replaced by
what was recovered (the floor from state.json, the outbox's good records). After
every cut the device boots its good slot and tells the truth, no report it
acknowledged (the set-aside notices) is lost, and the damaged bytes are never
lost: each is still at its name or under its `.corrupt-*` name."""

from __future__ import annotations

import time
from pathlib import Path

from tests.powercut.conftest import Releases
from tests.powercut.explore import RESULTS, Scenario
from tests.powercut.replay import State, Trace
from tests.powercut.test_power_cut_states import explorer_for

FLOOR_GARBAGE = b"\x00not a number" * 3
OUTBOX_GARBAGE = b"\xff\xfe garbage that is not a record\n" * 200


def test_damaged_state_set_aside_survives_a_power_cut_at_every_op(tmp_path: Path, releases: Releases) -> None:
    started = time.monotonic()
    scenario = Scenario("set-aside", ("status",), ("A", "B"), frozenset({"factory"}), pending=False)
    explorer = explorer_for(tmp_path, releases, scenario, "sim", installs=1)
    state_dir = explorer.dir / "state"
    (state_dir / "security-floor").write_bytes(FLOOR_GARBAGE)
    (state_dir / "outbox.log").write_bytes(OUTBOX_GARBAGE)
    trace = explorer.trace(tmp_path / "trace")
    assert any(op["op"] == "rename" and ".corrupt-" in op["dst"] for op in trace.ops), "nothing was set aside"
    kept_in: dict[str, list[str]] = {name: [] for name in ("security-floor", "outbox.log")}
    original = explorer.check

    def check_keeps_the_damage(trace: Trace, state: State, *, next_install: bool) -> list[str]:
        explorer.materialize(trace, state)
        problems = []
        for name, garbage in (("security-floor", FLOOR_GARBAGE), ("outbox.log", OUTBOX_GARBAGE)):
            holders = [p.name for p in state_dir.glob(name + "*") if p.read_bytes() == garbage]
            if not holders:
                problems.append(f"the damaged {name} is lost")
            kept_in[name] += holders
        return problems + original(trace, state, next_install=next_install)

    explorer.check = check_keeps_the_damage  # type: ignore[method-assign]  # the explorer's check, plus this
    result = explorer.explore(trace)
    result.seconds = time.monotonic() - started
    RESULTS.append(result)
    assert result.distinct > 1
    assert not result.failures, "\n".join(result.failures[:20])
    for name, holders in kept_in.items():  # the states cover both sides of the rename
        assert name in holders
        assert any(".corrupt-" in h for h in holders)
