"""The v1 topic layout, and names that cannot be topic levels are refused
with a specific error."""

from __future__ import annotations

import pytest

from agent.mqtt.errors import TopicError
from agent.mqtt.topics import MAX_NAME, JobTopic, Topics, check_name, check_prefix, device_filter


def test_layout_is_versioned_and_keeps_devices_and_groups_apart() -> None:
    t = Topics.for_device("gw-1", "acme/ota")
    assert t.jobs_filter == "acme/ota/v1/devices/gw-1/jobs/+"
    assert t.job("j1") == "acme/ota/v1/devices/gw-1/jobs/j1"
    assert t.job_status("j1") == "acme/ota/v1/devices/gw-1/jobs/j1/status"
    assert t.status == "acme/ota/v1/devices/gw-1/status"
    assert t.presence == "acme/ota/v1/devices/gw-1/presence"
    assert t.events == "acme/ota/v1/devices/gw-1/events"
    assert t.progress == "acme/ota/v1/devices/gw-1/progress"
    assert t.chunks("j1") == "acme/ota/v1/devices/gw-1/jobs/j1/chunks"
    assert t.credit("j1") == "acme/ota/v1/devices/gw-1/jobs/j1/credit"
    assert t.group_jobs_filter("canary") == "acme/ota/v1/groups/canary/jobs/+"
    assert t.group_job("canary", "j1") == "acme/ota/v1/groups/canary/jobs/j1"
    assert device_filter("acme/ota", "status") == "acme/ota/v1/devices/+/status"


def test_a_device_called_groups_does_not_collide_with_the_group_tree() -> None:
    t = Topics.for_device("groups")
    assert t.parse_job_topic("edge-ota/v1/devices/groups/jobs/j1") == JobTopic("j1")
    assert t.parse_job_topic("edge-ota/v1/groups/jobs/jobs/j1", ()) is None


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "+", "#", "dev+", "dev#", "$SYS", "-lead", ".hidden", "sp ace", "tab\t", "nl\n", "é",
     "x" * (MAX_NAME + 1), "nul\x00"],
)
def test_names_that_cannot_be_a_topic_level_are_refused(name: str) -> None:
    with pytest.raises(TopicError, match=r"device id: .* is not a valid name"):
        Topics.for_device(name)


def test_non_string_names_are_refused() -> None:
    with pytest.raises(TopicError, match="group: must be a string, got int"):
        check_name("group", 7)


def test_longest_allowed_name_is_accepted() -> None:
    assert check_name("job id", "a" * MAX_NAME) == "a" * MAX_NAME


@pytest.mark.parametrize("prefix", ["", "/lead", "trail/", "a//b", "a/+/b", "a/#", "$SYS/x", "x" * 129, "sp ace"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(TopicError, match="topic prefix"):
        check_prefix(prefix)


def test_job_topics_are_recognised_for_the_device_and_its_groups_only() -> None:
    t = Topics.for_device("gw-1")
    assert t.parse_job_topic("edge-ota/v1/devices/gw-1/jobs/j-7") == JobTopic("j-7")
    assert t.parse_job_topic("edge-ota/v1/groups/g1/jobs/j-7", ("g1",)) == JobTopic("j-7", "g1")
    assert t.parse_job_topic("edge-ota/v1/groups/g2/jobs/j-7", ("g1",)) is None
    assert t.parse_job_topic("edge-ota/v1/devices/gw-2/jobs/j-7") is None
    assert t.parse_job_topic("edge-ota/v1/devices/gw-1/jobs/j-7/status") is None  # our own report
    assert t.parse_job_topic("edge-ota/v1/devices/gw-1/status") is None


def test_a_job_topic_with_an_unusable_id_is_a_topic_error() -> None:
    t = Topics.for_device("gw-1")
    with pytest.raises(TopicError, match="job id"):
        t.parse_job_topic("edge-ota/v1/devices/gw-1/jobs/" + "x" * 200)
    with pytest.raises(TopicError, match="job id"):
        t.parse_job_topic("edge-ota/v1/devices/gw-1/jobs/")
