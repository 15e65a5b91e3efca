"""Stall and deadline accounting (agent.pace) on a fake clock: only time spent
waiting for the peer counts towards a stall, only delivered bytes count as
progress, and the deadline is wall clock from the start."""

from __future__ import annotations

import pytest

from agent.errors import SourceError
from agent.pace import Pace, PaceLimits


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _wait(pace: Pace, clock: FakeClock, seconds: float, delivered: int = 0) -> None:
    pace.budget()
    clock.now += seconds
    pace.waited()
    pace.delivered(delivered)


def test_fewer_bytes_than_the_limit_in_a_window_of_waiting_is_a_transient_stall() -> None:
    clock = FakeClock()
    pace = Pace("src", PaceLimits(stall_bytes=100, stall_seconds=10), clock)
    _wait(pace, clock, 6, delivered=60)
    _wait(pace, clock, 4.5, delivered=30)
    with pytest.raises(SourceError, match=r"^src: stalled: fewer than 100 bytes in 10 s after 90 bytes$") as e:
        pace.budget()
    assert e.value.transient


def test_enough_bytes_in_each_window_never_stall() -> None:
    clock = FakeClock()
    pace = Pace("src", PaceLimits(stall_bytes=100, stall_seconds=10), clock)
    for _ in range(1000):
        _wait(pace, clock, 9, delivered=100)
    assert pace.received == 100_000


def test_time_the_consumer_spends_between_reads_is_not_blamed_on_the_peer() -> None:
    clock = FakeClock()
    pace = Pace("src", PaceLimits(stall_bytes=100, stall_seconds=10), clock)
    for _ in range(5):
        _wait(pace, clock, 1, delivered=1)
        clock.now += 3600  # writing a huge ZERO extent, say
    assert pace.budget() == pytest.approx(5)


def test_the_budget_of_a_wait_is_what_is_left_of_the_window_and_the_deadline() -> None:
    clock = FakeClock()
    pace = Pace("src", PaceLimits(stall_bytes=100, stall_seconds=10, deadline=30), clock)
    assert pace.budget() == pytest.approx(10)
    pace.waited()
    clock.now += 25  # consumer time still counts for the deadline
    assert pace.budget() == pytest.approx(5)
    pace.waited()
    clock.now += 5
    with pytest.raises(SourceError, match=r"deadline of 30 s passed after 0 bytes"):
        pace.budget()


def test_the_phase_is_named_in_the_error() -> None:
    clock = FakeClock()
    pace = Pace("src", PaceLimits(stall_bytes=1, stall_seconds=1), clock)
    pace.phase = "reading trailers"
    _wait(pace, clock, 2)
    with pytest.raises(SourceError, match=r"after 0 bytes \(reading trailers\)$"):
        pace.budget()
