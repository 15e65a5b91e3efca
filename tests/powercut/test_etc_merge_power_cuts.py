"""The /etc merge at every traced op, with unsynced writes dropped (and as a
kill, the `all` variant): the new slot's /etc is the old one or the merged one,
never a mix, and the next merge completes it. The merge builds the tree beside
/etc, fsyncs it and swaps it in with renameat2(RENAME_EXCHANGE), which the
replayer models as a directory exchange durable once the parent is fsynced."""

from __future__ import annotations

import time
from pathlib import Path

from agent.etcmerge import EtcConfig, merge_trees
from tests.powercut.etcstates import check_state, make_trees, merged_reference, snapshot
from tests.powercut.explore import RESULTS, Result, materialize
from tests.powercut.test_crash_model import traced


def test_a_power_cut_at_any_op_of_the_etc_merge_leaves_the_old_or_the_merged_etc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    old, cur, slot = make_trees(root)
    unmerged = snapshot(slot / "etc")
    merged = merged_reference(old, cur, slot, tmp_path)
    assert merged != unmerged
    trace = traced(root, tmp_path / "log", lambda: merge_trees(old, cur, slot, EtcConfig(merge=True)))
    kinds = {op["op"] for op in trace.ops}
    assert {"exchange", "mkdir", "symlink", "chmod", "unlink", "rmdir", "dirsync"} <= kinds
    started = time.monotonic()
    result = Result("etc-merge", "-", ops=trace.fs_ops)
    distinct: dict[str, object] = {}
    for state in trace.states():
        result.explored += 1
        tree = trace.tree_hash(state)
        if tree in distinct:
            continue
        distinct[tree] = state
        materialize(root, trace, state)
        for problem in check_state(old, cur, slot, unmerged, merged):
            result.failures.append(f"cut before op {state.cut} ({state.variant}): {problem}")
    result.distinct = len(distinct)
    result.seconds = time.monotonic() - started
    RESULTS.append(result)
    assert not result.failures, "\n".join(result.failures[:10])
