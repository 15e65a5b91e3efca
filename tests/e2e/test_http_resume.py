"""Installs over http survive bad networks: a real origin (Range, ETag, If-Range)
behind a fault-injecting TCP proxy that resets, stalls, truncates and corrupts
connections. The install resumes from the byte it reached (downloading less
than 1.1x the bundle), a corrupted byte is caught by the op payload hash and
only that op's range is fetched again, a server ignoring Range still works, a
resource replaced mid-download fails at once, refusals (4xx, a bad signature)
are never retried, and when the retries are exhausted the install fails with
the reason and the bytes downloaded recorded, the new slot never bootable."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.format.header import HEADER_SIZE, Header
from bundler.format.ops import OpType, unpack_table
from tests.e2e._download import Origin, download_table, origin
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, KeyPair
from tests.fixtures.faultproxy import Faults

MiB = 1 << 20


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Origin]:
    yield from origin(tmp_path / "www")


@pytest.fixture
def lab_ignoring_range(tmp_path: Path) -> Iterator[Origin]:
    yield from origin(tmp_path / "www-norange", ignore_range=True)


@pytest.fixture
def bundle(make_bundle: BundleFactory) -> Path:
    return make_bundle("2.0")


def assert_installed(device: SimDevice) -> dict[str, object]:
    doc = device.status()
    assert (doc["primary"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "trial", "2.0")
    last: dict[str, object] = doc["last_result"]
    assert (last["event"], last["result"]) == ("install", "ok")
    return last


def assert_failed_and_nothing_bootable(device: SimDevice, fragment: str) -> dict[str, object]:
    doc = device.status()
    assert (doc["booted"], doc["primary"]) == ("A", "A")
    assert doc["slots"]["B"]["bootable"] is False or doc["slots"]["B"]["version"] != "2.0"
    assert doc["slots"]["B"]["boot_state"] != "trial"
    last: dict[str, object] = doc["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert fragment in str(last["reason"]), last
    return last


def starts(ranges: list[str | None]) -> list[int]:
    out = []
    for r in ranges:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", r or "bytes=0-")
        assert m, r
        out.append(int(m.group(1)))
    return out


def test_install_completes_through_resets_stalls_and_truncations_downloading_under_1_1x(
    device: SimDevice, lab: Origin, bundle: Path
) -> None:
    download_table(device)
    name = lab.publish(bundle)
    lab.proxy.then(Faults(reset_after=MiB), Faults(stall_after=MiB), Faults(truncate_after=MiB // 2))
    device.install_ok(lab.url(name))
    last = assert_installed(device)
    size = bundle.stat().st_size
    assert size <= int(str(last["downloaded"])) < 1.1 * size
    assert lab.proxy.fired == 3
    ranges = lab.ranges()
    assert len(ranges) == 4
    assert ranges[0] is None  # the first request is a plain GET
    positions = starts(ranges)
    assert positions == sorted(positions)  # every resume goes on, never back to 0
    assert positions[1] > 0
    assert all(b"If-Range: " in r for r in lab.proxy.requests[1:])


def test_a_corrupted_byte_is_caught_and_only_its_op_range_is_fetched_again(
    device: SimDevice, lab: Origin, bundle: Path
) -> None:
    download_table(device)
    name = lab.publish(bundle)
    data = bundle.read_bytes()
    header = Header.unpack(data[:HEADER_SIZE])
    table = unpack_table(data[header.op_table_offset : header.payload_offset])
    ops = [op for op in table if op.type is not OpType.ZERO]
    op = ops[len(ops) // 2]
    start = header.payload_offset + op.payload_offset
    lab.proxy.then(Faults(flip_at=start + op.payload_length // 3))
    device.install_ok(lab.url(name))
    last = assert_installed(device)
    assert lab.proxy.fired == 1
    assert lab.ranges() == [None, f"bytes={start}-{start + op.payload_length - 1}"]
    assert int(str(last["downloaded"])) == len(data) + op.payload_length


def test_a_server_that_ignores_range_still_gets_the_install_through(
    device: SimDevice, lab_ignoring_range: Origin, bundle: Path
) -> None:
    lab = lab_ignoring_range
    download_table(device)
    name = lab.publish(bundle)
    lab.proxy.then(Faults(reset_after=2 * MiB))
    device.install_ok(lab.url(name))
    last = assert_installed(device)
    size = bundle.stat().st_size
    # the second answer starts at byte 0 again: the bytes before the resume point are read and dropped
    assert size < int(str(last["downloaded"])) <= size + 2 * MiB
    assert len(lab.ranges()) == 2
    assert lab.ranges()[1] is not None


def test_a_bundle_replaced_mid_download_fails_at_once_and_clearly(
    device: SimDevice, lab: Origin, bundle: Path, make_bundle: BundleFactory
) -> None:
    download_table(device)
    name = lab.publish(bundle)
    other = make_bundle("3.0")
    lab.proxy.then(Faults(reset_after=MiB, then=lambda: lab.publish(other, name)))
    line = device.install(lab.url(name)).one_error_line()
    assert "the resource changed during the download" in line, line
    assert len(lab.proxy.requests) == 2  # not retried
    assert_failed_and_nothing_bootable(device, "the resource changed")


@pytest.mark.parametrize(("status", "attempts"), [(403, 1), (404, 1), (410, 1), (503, 5), (429, 5)])
def test_client_errors_fail_at_once_and_server_errors_are_retried(
    device: SimDevice, lab: Origin, status: int, attempts: int
) -> None:
    download_table(device)
    before = device.snapshot()
    line = device.install(lab.url(f"status/{status}/update.otab")).one_error_line()
    assert f"HTTP {status}" in line
    assert len(lab.proxy.requests) == attempts
    last = device.status()["last_result"]
    assert (last["result"], last["downloaded"]) == ("failed", 0)
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B"), after.bootloader) == (before.slot("A"), before.slot("B"),
                                                                    before.bootloader)


def test_a_signature_failure_is_not_retried(
    device: SimDevice, lab: Origin, make_bundle: BundleFactory, other_key: KeyPair
) -> None:
    download_table(device)
    name = lab.publish(make_bundle("2.0", key=other_key))
    line = device.install(lab.url(name)).one_error_line()
    assert "signature" in line.lower() or "key" in line.lower(), line
    assert len(lab.proxy.requests) == 1


def test_exhausted_retries_fail_the_install_with_the_reason_and_bytes_downloaded(
    device: SimDevice, lab: Origin, bundle: Path
) -> None:
    download_table(device)
    name = lab.publish(bundle)
    lab.proxy.default = Faults(reset_after=0)  # after the first connection, none brings a byte
    lab.proxy.then(Faults(reset_after=2 * MiB))
    line = device.install(lab.url(name)).one_error_line()
    assert "gave up after 5 attempts" in line, line
    last = assert_failed_and_nothing_bootable(device, "gave up after 5 attempts")
    downloaded = int(str(last["downloaded"]))
    # What the first connection delivered before its reset: at most the 2 MiB the proxy
    # sent, and less when the reset discarded bytes still in the receive buffer (load).
    assert 0 < downloaded <= 2 * MiB
    assert len(lab.proxy.requests) == 5
    failed = [r for r in device.outbox() if r["result"] == "failed"]
    assert failed[-1]["downloaded"] == downloaded
