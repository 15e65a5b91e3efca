"""Installing from an http:// URL when the server misbehaves: a 404, nothing
listening, or the connection closed in the middle of the bundle. Each is one
clear error line, is reported, and leaves nothing bootable changed. Transient
failures are retried (quickly here: a small `[download]` backoff), so a server
that cuts every attempt at the same byte fails once the retries are used up."""

from __future__ import annotations

import socket

import pytest

from bundler.format.header import HEADER_SIZE, Header
from tests.e2e._hostile import set_download
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, HttpServer


@pytest.fixture(autouse=True)
def _fast_retries(device: SimDevice) -> None:
    set_download(device, retries=2, retry_backoff=0.01, retry_backoff_max=0.02)


def assert_reported_failure(dev: SimDevice, outbox_before: int, fragment: str) -> None:
    last = dev.status()["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert fragment in last["reason"]
    assert [e for e in dev.outbox()[outbox_before:] if e["result"] == "failed"] == [last]


def test_http_404_is_one_clear_error_and_changes_nothing(device: SimDevice, http_server: HttpServer) -> None:
    before = device.snapshot()
    outbox_before = len(device.outbox())
    url = http_server.url("missing.otab")
    line = device.install(url).one_error_line()
    assert url in line
    assert "HTTP 404" in line
    after = device.snapshot()
    assert after.hashes["slot-A.img"] == before.hashes["slot-A.img"]
    assert after.hashes["slot-B.img"] == before.hashes["slot-B.img"]
    assert after.bootloader == before.bootloader
    assert_reported_failure(device, outbox_before, "HTTP 404")


def test_nothing_listening_is_one_clear_error_and_changes_nothing(device: SimDevice) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = device.snapshot()
    outbox_before = len(device.outbox())
    line = device.install(f"http://127.0.0.1:{port}/update.otab").one_error_line()
    assert "cannot connect" in line
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B"), after.bootloader) == (
        before.slot("A"),
        before.slot("B"),
        before.bootloader,
    )
    assert_reported_failure(device, outbox_before, "cannot connect")


def test_unsupported_url_scheme_is_one_clear_error(device: SimDevice) -> None:
    before = device.snapshot()
    line = device.install("ftp://example.invalid/update.otab").one_error_line()
    assert "unsupported URL scheme" in line
    assert device.snapshot().bootloader == before.bootloader


@pytest.mark.parametrize("where", ["in the head", "in the payload"])
def test_server_closing_mid_stream_is_a_clear_error_and_nothing_bootable_changes(
    device: SimDevice, make_bundle: BundleFactory, http_server: HttpServer, where: str
) -> None:
    bundle = make_bundle("2.0")
    name = http_server.publish(bundle)
    header = Header.unpack(bundle.read_bytes()[:HEADER_SIZE])
    sent = HEADER_SIZE + 10 if where == "in the head" else header.payload_offset + header.payload_length // 2
    before = device.snapshot()
    outbox_before = len(device.outbox())
    line = device.install(http_server.url(f"cut/{sent}/{name}")).one_error_line()
    # Either the source notices the short body or the reader the short bundle.
    assert "truncated" in line or http_server.url("") in line, line

    after = device.snapshot()
    assert after.slot("A") == before.slot("A")
    old, new = before.boot_doc(), after.boot_doc()
    assert new["slots"]["A"] == old["slots"]["A"]
    assert new["last_good"] == "A"
    doc = device.status()
    assert (doc["booted"], doc["primary"]) == ("A", "A")
    assert doc["slots"]["B"]["bootable"] is (where == "in the head")
    if where == "in the head":
        assert after.slot("B") == before.slot("B")
        assert after.bootloader == before.bootloader
    last = doc["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert [e for e in device.outbox()[outbox_before:] if e["result"] == "failed"] == [last]


def test_install_succeeds_from_the_same_server_after_a_cut(
    device: SimDevice, make_bundle: BundleFactory, http_server: HttpServer
) -> None:
    bundle = make_bundle("2.0")
    name = http_server.publish(bundle)
    device.install(http_server.url(f"cut/{bundle.stat().st_size // 2}/{name}")).one_error_line()
    device.install_ok(http_server.url(name))
    doc = device.status()
    assert (doc["primary"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "trial", "2.0")
