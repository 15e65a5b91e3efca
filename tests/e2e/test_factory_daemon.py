"""`ota-agent run` on a blank board in a factory environment (no slot marker on
the kernel command line, no bootloader state yet): the daemon starts and serves
its front ends, so a station can provision through them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent import service, wiring
from agent.commands import execute
from tests.e2e._factory import BlankDevice
from tests.e2e._sim import COMPATIBLE
from tests.e2e.conftest import BundleFactory, Images, KeyPair


def test_the_daemon_serves_a_blank_board_and_provisions_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, make_bundle: BundleFactory,
    images: Images,
) -> None:
    dev = BlankDevice(tmp_path / "device", capsys, backend="grub", keyring=signing_key.public, compatible=COMPATIBLE)
    app = wiring.build_app(dev.config)
    assert service.idle_line(app) == "no slot booted (a factory environment); idle"
    stop = threading.Event()
    daemon = threading.Thread(target=service.run, args=(app, []), kwargs={"stop": stop}, daemon=True)
    daemon.start()
    try:
        reply = execute(app, "provision", {"bundle": str(make_bundle("1.0", image=images.v2))}, origin="test")
        assert reply.ok, reply.error
    finally:
        stop.set()
        daemon.join(10)
    assert not daemon.is_alive()
    assert dev.record["complete"] is True
