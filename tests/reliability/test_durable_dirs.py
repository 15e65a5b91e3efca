"""Regression for a class of defects the crash-point matrix found: a file written
durably (temp, fsync, rename, fsync of its directory) inside a directory just
created was lost to a power cut, because the new directory's own entry in its
parent was never synced (provisioning's record and key vanished after a cut
right after the key was made). `fsutil.make_dirs` syncs each new directory's
parent; every state and record writer creates its directories with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.provision import record
from agent.state import StateStore
from ota_common.fsutil import atomic_write, ensure_private_dir, make_dirs
from tests.powercut.test_crash_model import traced, tree


def _record(d: Path) -> None:
    record.save(d / "provision", record.Record(steps={}, info={"device_id": "x"}))


def _state(d: Path) -> None:
    StateStore(d / "state").save(StateStore(d / "state").load())


def _private(d: Path) -> None:
    ensure_private_dir(d / "a" / "b")
    atomic_write(d / "a" / "b" / "f", b"kept")


def _plain(d: Path) -> None:
    make_dirs(d / "x" / "y")
    atomic_write(d / "x" / "y" / "f", b"kept")


@pytest.mark.parametrize("write", [_record, _state, _private, _plain], ids=lambda f: f.__name__.strip("_"))
def test_a_file_synced_inside_a_new_directory_survives_a_power_cut(tmp_path: Path, write: Callable[[Path], None]
                                                                   ) -> None:
    root = tmp_path / "root"
    root.mkdir()
    trace = traced(root, tmp_path / "log", lambda: write(root))
    kept = tree(trace, len(trace.ops), "synced")
    written = tree(trace, len(trace.ops), "all")
    assert written
    assert set(kept) == set(written), f"lost to a cut: {sorted(set(written) - set(kept))}"
