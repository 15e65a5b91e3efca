"""Each byte of a stick is read once (RAUC CVE-2020-25860 was a verify, then a
reopen and reread): the install of the bundle selection chose replays its
verified head from memory and reads on from the same descriptor. Changing the
stick's file between selection and install (its head rewritten in place, its
name pointed at another file) changes nothing that is installed; changing its
payload in place is caught by the payload hashes as it is read, and the target
slot stays unbootable. A source is read once: a second open is refused.

In-process on a simulated device with a directory as the stick, so the test can
step in between selection and install.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import wiring
from agent.actions import App
from agent.errors import SourceError
from agent.events import utcnow
from agent.jobs import JobState
from agent.media.scan import scan
from agent.media.select import Selection, select
from agent.media.source import MediaSource
from tests.e2e._sim import COMPATIBLE, SimDevice
from tests.e2e.conftest import BundleFactory


@pytest.fixture
def stick(tmp_path: Path, make_bundle: BundleFactory) -> Path:
    bundle = tmp_path / "stick" / "edge-ota" / "v2.otab"
    bundle.parent.mkdir(parents=True)
    shutil.copyfile(make_bundle("2.0"), bundle)
    return bundle


@pytest.fixture
def chosen(device: SimDevice, stick: Path) -> Iterator[tuple[App, Selection]]:
    app = wiring.build_app(device.config)
    root = os.open(stick.parent.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = scan(root)
        selection = select(root, found.candidates, keyring=app.device.keyring(), compatible=COMPATIBLE,
                           security_floor=0, now=utcnow(), installed=None)
    finally:
        os.close(root)
    assert selection.chosen is not None
    try:
        yield app, selection
    finally:
        selection.close()


def install(app: App, source: MediaSource) -> tuple[JobState, str | None]:
    view = app.queue.run_inline("install", lambda ctx: app.install(ctx, source), origin="test")
    return view.state, view.error


def test_a_head_rewritten_and_a_name_replaced_after_selection_change_nothing_installed(
    device: SimDevice, stick: Path, chosen: tuple[App, Selection]
) -> None:
    app, selection = chosen
    assert selection.chosen is not None
    head = len(selection.chosen.raw)
    with stick.open("r+b") as f:  # the same file, its signed head (and only that) garbled in place
        f.write(bytes(head))
    stick.rename(stick.with_name("moved.otab"))
    stick.write_bytes(b"not the bundle that was verified")
    source = MediaSource(selection.chosen, "stick")
    assert install(app, source) == (JobState.SUCCEEDED, None)
    status = device.status()
    assert (status["primary"], status["slots"]["B"]["version"]) == ("B", "2.0")
    with pytest.raises(SourceError, match="already read once"):
        source.open()


def test_a_payload_changed_in_place_after_selection_is_caught_and_the_slot_stays_unbootable(
    device: SimDevice, stick: Path, chosen: tuple[App, Selection]
) -> None:
    app, selection = chosen
    assert selection.chosen is not None
    with stick.open("r+b") as f:
        f.seek(stick.stat().st_size - 1000)
        f.write(b"\xff" * 100)
    state, error = install(app, MediaSource(selection.chosen, "stick"))
    assert state is JobState.FAILED
    assert error is not None
    assert "sha256" in error.lower() or "hash" in error.lower()
    status = device.status()
    assert (status["primary"], status["slots"]["B"]["bootable"]) == ("A", False)
