"""The operator's view of one job on many devices (`bundler.fleet.deploy.Follower`):
reports arrive at least once and from two publishers, so duplicates are
dropped by id and each device keeps its furthest state; a deploy is done when
every target answered (or, with --wait, finished), and ok only when every
target succeeded."""

from __future__ import annotations

from typing import Any

import pytest

from bundler.fleet.deploy import Follower

JOB = "deploy-1"


def report(device: str, status: str, rid: str, **extra: Any) -> dict[str, Any]:
    return {"schema": 1, "id": rid, "device": device, "job": JOB, "status": status, **extra}


def test_each_device_keeps_its_furthest_state_and_duplicates_are_dropped() -> None:
    f = Follower(JOB, ["gw-1"], set())
    assert f.feed(report("gw-1", "in-progress", "r2")) is not None
    assert f.feed(report("gw-1", "queued", "r1")) is None  # the immediate answer, overtaken
    assert f.feed(report("gw-1", "in-progress", "r2")) is None  # a redelivery
    changed = f.feed(report("gw-1", "installed", "r3", reason="written"))
    assert changed is not None
    assert changed.line() == "gw-1: installed - written"
    assert f.feed(report("gw-1", "succeeded", "r4")) is not None
    assert f.feed(report("gw-1", "failed", "r5")) is None  # a final state never changes
    assert f.targets["gw-1"].statuses == ["in-progress", "installed", "succeeded"]
    assert f.done(wait=True)
    assert f.ok(wait=True)


def test_reports_of_other_jobs_and_other_devices_are_ignored_for_named_devices() -> None:
    f = Follower(JOB, ["gw-1"], set())
    assert f.feed({**report("gw-1", "succeeded", "x"), "job": "other"}) is None
    assert f.feed(report("gw-9", "succeeded", "y")) is None
    assert list(f.targets) == ["gw-1"]


def test_without_wait_the_first_answers_are_enough_and_a_refusal_is_not_ok() -> None:
    f = Follower(JOB, ["gw-1", "gw-2"], set())
    f.feed(report("gw-1", "queued", "a"))
    assert not f.done(wait=False)
    f.feed(report("gw-2", "rejected", "b", reason="busy: job x is running"))
    assert f.done(wait=False)
    assert not f.done(wait=True)
    assert not f.ok(wait=False)


@pytest.mark.parametrize("final", ["failed", "rolled-back", "rejected", "canceled"])
def test_with_wait_any_final_state_but_success_fails_the_deploy(final: str) -> None:
    f = Follower(JOB, ["gw-1", "gw-2"], set())
    f.feed(report("gw-1", "succeeded", "a"))
    f.feed(report("gw-2", final, "b"))
    assert f.done(wait=True)
    assert not f.ok(wait=True)


def test_a_group_job_waits_for_the_known_members_and_takes_in_devices_that_answer() -> None:
    f = Follower(JOB, None, {"gw-1", "gw-2"})
    f.feed(report("gw-1", "succeeded", "a"))
    f.feed(report("gw-3", "succeeded", "c"))  # a member the retained status did not show
    assert not f.done(wait=True)  # gw-2 has not answered
    f.feed(report("gw-2", "succeeded", "b"))
    assert f.done(wait=True)
    assert sorted(f.targets) == ["gw-1", "gw-2", "gw-3"]
    assert f.ok(wait=True)


def test_a_group_job_with_an_expected_count_waits_for_that_many_answers() -> None:
    f = Follower(JOB, None, set(), expect=2)
    f.feed(report("gw-1", "succeeded", "a"))
    assert not f.done(wait=True)
    f.feed(report("gw-2", "succeeded", "b"))
    assert f.done(wait=True)


def test_nobody_answering_is_never_ok() -> None:
    assert not Follower(JOB, None, set()).ok(wait=False)
    named = Follower(JOB, ["gw-1"], set())
    assert not named.done(wait=False)
    assert not named.ok(wait=False)
