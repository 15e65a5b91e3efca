"""`Retry-After` on 429 and 503, through the real fault proxy in front of the lab
bundle server: the agent waits what the server asks (delta seconds or an
HTTP-date), never more than `[download] retry_backoff_max`, then resumes; and a
cancel that arrives while it waits ends the wait at once (an Event wait, not a
sleep), the job canceled with nothing written. The waits are read from the
agent's own "retrying in N s" log line, never timed."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from agent.config import DownloadConfig
from agent.errors import CanceledError
from agent.ranged import HttpRangeSource
from ota_common.retryafter import parse_retry_after
from tests.e2e._api import Client, running, wait_for
from tests.e2e._download import Origin, download_table, origin
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory
from tests.fixtures.faultproxy import Faults


def busy(status: int, retry_after: str) -> Faults:
    reason = {429: "Too Many Requests", 503: "Service Unavailable"}[status]
    return Faults(answer=(f"HTTP/1.1 {status} {reason}\r\nRetry-After: {retry_after}\r\nContent-Length: 0\r\n"
                          "Connection: close\r\n\r\n").encode())


def http_date(delta: timedelta) -> str:
    return format_datetime(datetime.now(UTC) + delta, usegmt=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Origin]:
    yield from origin(tmp_path / "www")


def test_retry_after_is_read_as_seconds_or_an_http_date_and_anything_else_is_ignored() -> None:
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Tue, 01 Dec 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Tue, 01 Dec 2026 11:00:00 GMT", now) == 0.0  # in the past: at once
    for junk in (None, "", "-5", "1.5", "soon", "Tue, 99 Foo 2026", "9" * 100):
        assert parse_retry_after(junk, now) is None


def test_429_and_503_wait_what_retry_after_asks_capped_by_retry_backoff_max(
    device: SimDevice, lab: Origin, make_bundle: BundleFactory
) -> None:
    name = lab.publish(make_bundle("2.0"))
    # The backoff alone would wait 0.01..0.03 s; the server asks for 1 s, then for an hour.
    download_table(device, retry_backoff=0.01, retry_backoff_max=1.5)
    lab.proxy.then(busy(429, "1"), busy(503, http_date(timedelta(hours=1))))
    run = device.install_ok(lab.url(name))
    waits = [line for line in run.err.splitlines() if "retrying in" in line]
    assert len(waits) == 2, waits
    assert "HTTP 429 Too Many Requests (Retry-After 1 s); retrying in 1.0 s" in waits[0]
    # an hour from the date the server sent (less the seconds since), capped
    assert re.search(r"HTTP 503 Service Unavailable \(Retry-After 3[56]\d\d s\); retrying in 1\.5 s", waits[1])
    assert lab.proxy.fired == 2
    assert device.status()["last_result"]["result"] == "ok"


def test_a_503_without_retry_after_keeps_the_exponential_backoff(
    device: SimDevice, lab: Origin, make_bundle: BundleFactory
) -> None:
    name = lab.publish(make_bundle("2.0"))
    download_table(device, retry_backoff=0.01, retry_backoff_max=1.5)
    answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    lab.proxy.then(Faults(answer=answer))
    run = device.install_ok(lab.url(name))
    [wait] = [line for line in run.err.splitlines() if "retrying in" in line]
    assert "HTTP 503 Service Unavailable; retrying in 0.0 s" in wait


def test_a_cancel_during_the_retry_wait_ends_it_at_once(lab: Origin, make_bundle: BundleFactory) -> None:
    name = lab.publish(make_bundle("2.0"))
    limits = DownloadConfig(retries=3, retry_backoff=0.01, retry_backoff_max=3600.0)
    lab.proxy.then(busy(503, "3600"))
    source = HttpRangeSource(lab.url(name), limits)
    caught: list[BaseException] = []

    def read() -> None:
        try:
            with source.stream(0) as stream:
                stream.read(1024)
        except BaseException as e:  # the assertion below names it
            caught.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    wait_for("the 503 to be answered", lambda: lab.proxy.fired == 1)
    source.cancel.set()
    reader.join(timeout=30)  # an hour's wait unless the cancel ends it
    assert not reader.is_alive()
    [error] = caught
    assert isinstance(error, CanceledError)
    assert "canceled while waiting to retry" in str(error)
    assert len(lab.proxy.requests) == 1  # never tried again


def test_canceling_an_install_job_that_waits_on_retry_after_ends_it_at_once_and_writes_nothing(
    device: SimDevice, lab: Origin, make_bundle: BundleFactory
) -> None:
    name = lab.publish(make_bundle("2.0"))
    download_table(device, retry_backoff=0.01, retry_backoff_max=3600)
    lab.proxy.then(busy(429, "3600"))
    before = device.snapshot()
    with running(device) as daemon, Client(daemon.socket) as installer:
        installer.send({"id": 1, "command": "install", "args": {"source": lab.url(name)}, "follow": True})
        job = installer.answer()["job"]
        wait_for("the 429 to be answered", lambda: lab.proxy.fired == 1)
        with Client(daemon.socket) as other:
            assert other.call("cancel", "c")["reply"]["ok"]
        answers = installer.until(lambda a: "reply" in a)  # fails after 30 s, long before the hour
    reply = answers[-1]["reply"]
    assert (reply["ok"], reply["error"]["type"]) == (False, "CanceledError")
    assert "canceled while waiting to retry" in reply["error"]["message"]
    assert len(lab.proxy.requests) == 1
    last = device.status()["last_result"]
    assert (last["event"], last["result"], last["txn"]) == ("install", "cancelled", job["id"])
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B"), after.bootloader) == (before.slot("A"), before.slot("B"),
                                                                   before.bootloader)
