"""The MQTT topic layout, version 1, and the rules for the names in it.

Every topic starts with a configurable prefix (default `edge-ota`) and the
layout version `v1`. Devices and groups live under separate levels, so a
wildcard over devices can never match a group and a device may be called
anything the name rule allows (there is no reserved device name):

    <prefix>/v1/devices/<device>/jobs/<job>          operator -> device  a job document (QoS 1)
    <prefix>/v1/groups/<group>/jobs/<job>            operator -> devices a job for every member
    <prefix>/v1/devices/<device>/jobs/<job>/status   device -> operator  the job's lifecycle reports
    <prefix>/v1/devices/<device>/status              device -> operator  retained device state
    <prefix>/v1/devices/<device>/presence            device -> operator  retained online/offline (last will)
    <prefix>/v1/devices/<device>/events              device -> operator  event reports
    <prefix>/v1/devices/<device>/progress            device -> operator  progress reports
    <prefix>/v1/devices/<device>/jobs/<job>/chunks   operator -> device  bundle chunks of an install-stream job
    <prefix>/v1/devices/<device>/jobs/<job>/credit   device -> operator  flow-control credit for those chunks

A device subscribes to `.../jobs/+` (one level), so its own `.../jobs/<job>/status`
reports never come back to it as jobs.

Names (device ids, group names, job ids) are 1..64 characters from
`A-Z a-z 0-9 . _ -`, starting with a letter or digit: no wildcard (`+`, `#`),
no level separator (`/`), no `$` (broker-reserved topics), nothing a log line or
a shell could misread. The device id is also the MQTT client id.

Owns topic strings only: no payloads (schema.py), no client (link.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.mqtt.errors import TopicError
from ota_common.text import clean

LAYOUT = "v1"
DEFAULT_PREFIX = "edge-ota"
MAX_NAME = 64
MAX_PREFIX = 128
NAME_RULE = f"1 to {MAX_NAME} characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9._-]+")


def check_name(what: str, value: object) -> str:
    """`value` if it is a valid device id, group name or job id, else a `TopicError` naming `what`."""
    if not isinstance(value, str):
        raise TopicError(what, f"must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_NAME or not _NAME.fullmatch(value):
        raise TopicError(what, f"{clean(value, 80)!r} is not a valid name ({NAME_RULE})")
    return value


def check_prefix(value: object) -> str:
    """A topic prefix: one or more `/`-separated levels of `A-Z a-z 0-9 . _ -`, at most 128 characters."""
    if not isinstance(value, str):
        raise TopicError("topic prefix", f"must be a string, got {type(value).__name__}")
    levels = value.split("/")
    if not value or len(value) > MAX_PREFIX or not all(_PREFIX_LEVEL.fullmatch(level) for level in levels):
        rule = f"levels of A-Z a-z 0-9 . _ - separated by '/', at most {MAX_PREFIX} characters, no wildcards"
        raise TopicError("topic prefix", f"{clean(value, 80)!r} is not valid ({rule})")
    return value


@dataclass(frozen=True, slots=True)
class JobTopic:
    """Where an incoming job came from: its id (from the topic) and the group it was sent to, if any."""

    job_id: str
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one device under one prefix. Construct with `Topics.for_device`."""

    prefix: str
    device: str

    @classmethod
    def for_device(cls, device: str, prefix: str = DEFAULT_PREFIX) -> Topics:
        return cls(check_prefix(prefix), check_name("device id", device))

    @property
    def root(self) -> str:
        return f"{self.prefix}/{LAYOUT}"

    @property
    def base(self) -> str:
        return f"{self.root}/devices/{self.device}"

    # operator -> device
    @property
    def jobs_filter(self) -> str:
        return f"{self.base}/jobs/+"

    def job(self, job_id: str) -> str:
        return f"{self.base}/jobs/{check_name('job id', job_id)}"

    def group_jobs_filter(self, group: str) -> str:
        return f"{self.root}/groups/{check_name('group', group)}/jobs/+"

    def group_job(self, group: str, job_id: str) -> str:
        return f"{self.root}/groups/{check_name('group', group)}/jobs/{check_name('job id', job_id)}"

    def chunks(self, job_id: str) -> str:
        return f"{self.job(job_id)}/chunks"

    # device -> operator
    def job_status(self, job_id: str) -> str:
        return f"{self.job(job_id)}/status"

    def credit(self, job_id: str) -> str:
        return f"{self.job(job_id)}/credit"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def presence(self) -> str:
        return f"{self.base}/presence"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def progress(self) -> str:
        return f"{self.base}/progress"

    def parse_job_topic(self, topic: str, groups: tuple[str, ...] = ()) -> JobTopic | None:
        """The job topic `topic` names, if it is this device's or one of `groups`' job topic
        (exactly one level after `jobs/`); None for any other topic. A job id that breaks
        the name rule is a `TopicError`."""
        own = f"{self.base}/jobs/"
        if topic.startswith(own):
            job_id = topic[len(own) :]
            return None if "/" in job_id else JobTopic(check_name("job id", job_id))
        group_root = f"{self.root}/groups/"
        if topic.startswith(group_root):
            group, sep, job_id = topic[len(group_root) :].partition("/jobs/")
            if sep and group in groups and "/" not in job_id:
                return JobTopic(check_name("job id", job_id), group)
        return None


def device_filter(prefix: str, leaf: str) -> str:
    """An operator's subscription to one leaf of every device, e.g. `device_filter(p, "status")`."""
    return f"{check_prefix(prefix)}/{LAYOUT}/devices/+/{leaf}"
