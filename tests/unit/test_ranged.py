"""The resume/retry machinery of `agent.ranged`, driven through its scripted twin
(bytes in memory, one scripted fault per connection attempt, no sleeping): a
stream resumes from the byte it reached, only transient errors are retried,
with growing waits, an attempt that brought bytes restarts the count, and a
resource that changed is refused at once."""

from __future__ import annotations

import random

import pytest

from agent.config import DownloadConfig
from agent.errors import SourceError
from agent.ranged import RangeSource, ResourceChangedError
from agent.ranged_scripted import Fault, FaultKind, ScriptedRangeSource

DATA = random.Random(8).randbytes(300_000)
LIMITS = DownloadConfig(retries=3, retry_backoff=1.0, retry_backoff_max=4.0)


def read_all(stream: object, chunk: int = 10_000) -> bytes:
    out = bytearray()
    while data := stream.read(chunk):  # type: ignore[attr-defined]
        out += data
    return bytes(out)


def reset(after: int) -> Fault:
    return Fault(FaultKind.RESET, after=after)


def test_the_scripted_twin_is_a_range_source() -> None:
    source: RangeSource = ScriptedRangeSource(DATA)
    assert source.total() == len(DATA)
    assert source.validator() == '"v1"'
    assert read_all(source.fetch(1000, 5000)) == DATA[1000:6000]


@pytest.mark.parametrize(
    "fault",
    [
        reset(50_000),
        Fault(FaultKind.TRUNCATE, after=50_000),
        Fault(FaultKind.STALL),
        Fault(FaultKind.STATUS, status=503),
    ],
    ids=["reset", "truncate", "stall", "503"],
)
def test_a_broken_connection_resumes_from_the_byte_it_reached(fault: Fault) -> None:
    source = ScriptedRangeSource(DATA, [fault], LIMITS)
    assert read_all(source.stream()) == DATA
    if fault.kind in (FaultKind.RESET, FaultKind.TRUNCATE):
        assert source.requests == [(0, None), (fault.after, len(DATA))]
    else:  # refused before the first contact: the size is still unknown
        assert source.requests == [(0, None), (0, None)]
    assert source.downloaded == len(DATA)  # nothing fetched twice


def test_many_drops_with_progress_each_never_exhaust_the_retries() -> None:
    source = ScriptedRangeSource(DATA, [reset(10_000)] * 20, LIMITS)  # 20 drops, 3 retries allowed in a row
    assert read_all(source.stream()) == DATA
    assert source.connections == 21
    assert source.downloaded == len(DATA)


def test_waits_grow_exponentially_up_to_the_max() -> None:
    source = ScriptedRangeSource(DATA, [reset(0)] * 3, LIMITS)
    assert read_all(source.stream()) == DATA
    base = [1.0, 2.0, 4.0]
    assert len(source.slept) == 3
    for wait, b in zip(source.slept, base, strict=True):
        assert b <= wait <= b + LIMITS.retry_backoff  # jitter of up to one base


def test_consecutive_failures_without_progress_exhaust_the_policy() -> None:
    source = ScriptedRangeSource(DATA, [reset(5000)] + [reset(0)] * 10, LIMITS)
    stream = source.stream()
    with pytest.raises(SourceError, match=r"gave up after 4 attempts") as info:
        read_all(stream)
    assert info.value.transient
    assert source.downloaded == 5000
    # the connection that broke, then `retries` new ones that brought nothing
    assert len(source.requests) == 1 + LIMITS.retries


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
def test_client_errors_are_not_retried(status: int) -> None:
    source = ScriptedRangeSource(DATA, [Fault(FaultKind.STATUS, status=status)], LIMITS)
    with pytest.raises(SourceError, match=f"HTTP {status}") as info:
        read_all(source.stream())
    assert not info.value.transient
    assert len(source.requests) == 1
    assert source.slept == []


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_timeouts_throttling_and_server_errors_are_retried(status: int) -> None:
    source = ScriptedRangeSource(DATA, [Fault(FaultKind.STATUS, status=status)] * 2, LIMITS)
    assert read_all(source.stream()) == DATA
    assert len(source.requests) == 3


def test_a_server_ignoring_range_is_read_from_zero_and_skipped_to_the_offset() -> None:
    source = ScriptedRangeSource(DATA, [reset(100_000)], LIMITS, ranges=False)
    assert read_all(source.stream()) == DATA
    assert source.ranges is False
    assert source.downloaded == len(DATA) + 100_000  # the skipped bytes crossed the network again
    assert read_all(source.fetch(250_000, 100)) == DATA[250_000:250_100]


def test_a_resource_changed_mid_download_fails_at_once_and_clearly() -> None:
    other = bytes(len(DATA))
    source = ScriptedRangeSource(DATA, [reset(70_000), Fault(FaultKind.CHANGE, data=other)], LIMITS)
    with pytest.raises(ResourceChangedError, match=r"changed during the download: ETag \"v1\" became \"v2\""):
        read_all(source.stream())
    assert len(source.requests) == 2  # never retried


def test_a_resource_that_changed_size_is_refused_even_without_a_validator() -> None:
    source = ScriptedRangeSource(DATA, [reset(70_000), Fault(FaultKind.CHANGE, data=DATA + b"x")], LIMITS, etag=None)
    with pytest.raises(ResourceChangedError, match="size 300000 became 300001"):
        read_all(source.stream())


def test_a_flipped_byte_is_delivered_as_is_the_hashes_above_catch_it() -> None:
    source = ScriptedRangeSource(DATA, [Fault(FaultKind.FLIP, at=123)], LIMITS)
    got = read_all(source.stream())
    assert got[123] == DATA[123] ^ 0xFF
    assert read_all(source.fetch(100, 50)) == DATA[100:150]  # the refetch is clean


def test_a_fetch_past_the_end_is_refused() -> None:
    source = ScriptedRangeSource(DATA)
    source.total()
    with pytest.raises(SourceError, match="past its end"):
        source.fetch(len(DATA) - 10, 11)
