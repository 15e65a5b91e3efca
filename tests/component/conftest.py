"""Fixtures shared by the component tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.fleet.serve import BundleServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BundleServer]:
    """A real HTTP origin (`ota-fleet serve`'s server, Range and ETag) serving tmp_path/www."""
    (tmp_path / "www").mkdir()
    srv = BundleServer(tmp_path / "www", quiet=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
