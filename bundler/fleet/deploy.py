"""`ota-fleet deploy`: publish an install job (one per named device, or one
group job) and follow what the devices report.

The job is the wire schema's (`agent.mqtt.schema`, the one definition both
sides share): a fresh id (`deploy-<UTC time>-<random>`, or `--job-id` to send
the same job again: the devices answer a replay from their journal and never
run it twice), `created` now, `expires` when asked. Reports arrive on
`.../devices/+/jobs/<id>/status`, at least once and from two publishers (the
immediate answer and the device's outbox), so a `Follower` deduplicates them
by report id and keeps each device's furthest state: states only move forward
(queued, in-progress, installed, then one final state). One line is printed
per device per state change (`--json`: one object per device result).

Which devices a group job reaches is the broker's business; the follower
learns the members from the devices' retained status (which lists their
groups), read before the job is published, and from every device that
answers. A broker that delivers retained messages only to exact-topic
subscriptions (RabbitMQ before 3.13) tells no members: then `--expect N`
says how many answers to wait for, and otherwise the follower waits a short
quiet time after the last answering device finished.

Done: without `--wait`, when every target answered (accepted or refused);
with `--wait`, when every target reached a final state. The exit status is 0
only if every target succeeded (with `--wait`) or accepted the job (without),
and 1 when any failed, was refused, rolled back or did not finish in time.

Owns the operator's job lifecycle view; the connection is broker.py's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from agent.mqtt.errors import JobError, TopicError
from agent.mqtt.schema import DEFAULT_CHUNK, Job, JobStatus, JobType, encode, job_document, parse_job, parse_report
from agent.mqtt.topics import check_name
from bundler.fleet.broker import BrokerOptions, FleetClient, FleetError, Message
from bundler.fleet.stream import ChunkSender, digest
from ota_common.text import clean

log = logging.getLogger(__name__)

QUIET = 3.0  # seconds without a new answer before a group job with unknown members is done
_RANK = {JobStatus.QUEUED: 0, JobStatus.IN_PROGRESS: 1, JobStatus.INSTALLED: 2}
ACCEPTED = frozenset({JobStatus.QUEUED, JobStatus.IN_PROGRESS, JobStatus.INSTALLED, JobStatus.SUCCEEDED})


def rank(status: JobStatus) -> int:
    return _RANK.get(status, 3)


def new_job_id(now: datetime) -> str:
    return f"deploy-{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


@dataclass
class DeviceResult:
    device: str
    job: str
    status: JobStatus | None = None
    reason: str = ""
    time: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    statuses: list[str] = field(default_factory=list)
    duplicate: bool = False
    timed_out: bool = False
    conflicts: list[dict[str, Any]] = field(default_factory=list)  # the /etc merge's, from the latest report

    @property
    def final(self) -> bool:
        return self.status is not None and self.status.terminal

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "job": self.job, "status": self.status.value if self.status else None,
                "reason": self.reason, "time": self.time, "details": self.details, "statuses": self.statuses,
                "duplicate": self.duplicate, "final": self.final, "timed_out": self.timed_out,
                "conflicts": self.conflicts}

    def line(self) -> str:
        what = self.status.value if self.status else "no answer"
        text = f"{self.device}: {what}"
        if self.duplicate:
            text += " (a replay: the device had this job already)"
        if self.reason:
            text += f" - {self.reason}"
        if self.timed_out:
            text += " [timed out waiting]"
        return text


class Follower:
    """The operator's view of one job on many devices. Pure: fed report documents, it says
    which device's state advanced."""

    def __init__(self, job_id: str, devices: list[str] | None, members: set[str], expect: int = 0) -> None:
        self.job_id = job_id
        self.explicit = devices is not None
        self.targets: dict[str, DeviceResult] = {d: DeviceResult(d, job_id) for d in (devices or sorted(members))}
        self.expect = len(self.targets) if self.explicit else max(expect, len(members))
        self.members_known = bool(members) or expect > 0
        self._seen: set[str] = set()
        self.last_answer = time.monotonic()

    def feed(self, doc: dict[str, Any]) -> DeviceResult | None:
        """A job status report; the device's result when its state advanced."""
        if doc.get("job") != self.job_id or "status" not in doc:
            return None
        report_id = str(doc.get("id", ""))
        if report_id in self._seen:
            return None  # a redelivered duplicate
        self._seen.add(report_id)
        device = doc["device"]
        result = self.targets.get(device)
        if result is None:
            if self.explicit:
                return None
            result = self.targets[device] = DeviceResult(device, self.job_id)
        status = JobStatus(doc["status"])
        self.last_answer = time.monotonic()
        if result.final or (result.status is not None and rank(status) <= rank(result.status)):
            return None
        result.status = status
        result.reason = str(doc.get("reason", ""))
        result.time = str(doc.get("time", ""))
        result.duplicate = bool(doc.get("duplicate", False))
        details = doc.get("details")
        result.details = details if isinstance(details, dict) else {}
        conflicts = doc.get("conflicts")
        if isinstance(conflicts, list) and conflicts:
            result.conflicts = [c for c in conflicts if isinstance(c, dict)]
        result.statuses.append(status.value)
        return result

    def done(self, wait: bool) -> bool:
        answered = [r for r in self.targets.values() if r.status is not None]
        if len(answered) < max(self.expect, 1) or len(answered) < len(self.targets):
            return False
        if wait and not all(r.final for r in answered):
            return False
        if not self.explicit and not self.members_known:
            return time.monotonic() - self.last_answer >= QUIET
        return True

    def ok(self, wait: bool) -> bool:
        results = list(self.targets.values())
        if not results:
            return False
        if wait:
            return all(r.status is JobStatus.SUCCEEDED for r in results)
        return all(r.status in ACCEPTED for r in results)


@dataclass(frozen=True, slots=True)
class DeploySpec:
    url: str  # "" with `file`
    devices: list[str] | None  # None: a group job
    group: str | None
    wait: bool = False
    timeout: float = 0.0  # 0: 600 s with --wait, 60 s without
    job_id: str | None = None
    expires: float = 0.0  # seconds; 0: no expiry
    expect: int = 0
    allow_downgrade: bool = False
    as_json: bool = False
    file: Path | None = None  # stream this bundle over the broker (one device) instead of a URL
    chunk_size: int = DEFAULT_CHUNK


def build_job(spec: DeploySpec, now: datetime) -> Job:
    expires = now + timedelta(seconds=spec.expires) if spec.expires else None
    if spec.file is not None:
        size, sha256 = digest(spec.file)
        job = Job(id=spec.job_id or new_job_id(now), type=JobType.INSTALL_STREAM, created=now, expires=expires,
                  size=size, sha256=sha256, chunk_size=spec.chunk_size, allow_downgrade=spec.allow_downgrade)
    else:
        job = Job(id=spec.job_id or new_job_id(now), type=JobType.INSTALL, created=now, expires=expires,
                  url=spec.url, allow_downgrade=spec.allow_downgrade)
    try:  # the device will judge it the same way: refuse a bad one here, before it is sent
        parse_job(encode(job_document(job)))
    except (JobError, TopicError) as e:
        raise FleetError(f"the job would be refused: {e}") from None
    return job


def deploy(options: BrokerOptions, spec: DeploySpec, out: TextIO | None = None,
           clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    out = out or sys.stdout
    for device in spec.devices or []:
        _checked("--device", device)
    if spec.group is not None:
        _checked("--group", spec.group)
    if spec.file is not None and (spec.devices is None or len(spec.devices) != 1):
        raise FleetError("--file streams the bundle to one device over the broker: name exactly one --device "
                         "(serve it over HTTP and use --url for several devices or a group)")
    job = build_job(spec, clock())
    root = options.root
    timeout = spec.timeout or (600.0 if spec.wait else 60.0)
    with FleetClient(options) as client, contextlib.ExitStack() as stack:
        client.subscribe([f"{root}/devices/+/jobs/{job.id}/status"])
        sender: ChunkSender | None = None
        credit_topic = ""
        if spec.file is not None and spec.devices is not None:
            device = spec.devices[0]
            credit_topic = f"{root}/devices/{device}/jobs/{job.id}/credit"
            assert job.size is not None
            sender = ChunkSender(client, f"{root}/devices/{device}/jobs/{job.id}/chunks", spec.file, job.size,
                                 job.chunk_size)
            stack.callback(sender.close)
            client.subscribe([credit_topic])
        members: set[str] = set()
        if spec.group is not None:
            client.subscribe([f"{root}/devices/+/status"])
            client.sync()
            members = _members(client.drain(), spec.group)
            if not members and not spec.expect:
                print(f"ota-fleet: no member of group {spec.group} is known from the retained device status (a broker "
                      "that delivers retained messages only to exact topics, such as RabbitMQ before 3.13, tells "
                      "none); following whoever answers (--expect N waits for N devices)", file=sys.stderr)
        follower = Follower(job.id, spec.devices, members, spec.expect)
        payload = encode(job_document(job))
        if spec.devices is not None:
            for device in spec.devices:
                client.publish(f"{root}/devices/{device}/jobs/{job.id}", payload)
        else:
            client.publish(f"{root}/groups/{spec.group}/jobs/{job.id}", payload)
        target = ", ".join(spec.devices) if spec.devices is not None else f"group {spec.group}"
        what = (f"install {clean(str(spec.file), 200)}, {job.size} bytes streamed in chunks of {job.chunk_size}"
                if spec.file is not None else f"install {clean(spec.url, 200)}")
        print(f"ota-fleet: job {job.id} ({what}) sent to {target}", file=sys.stderr)
        deadline = time.monotonic() + timeout
        while not follower.done(spec.wait):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            message = client.next(min(remaining, 0.5))
            if message is None:
                continue
            if sender is not None and message.topic == credit_topic:
                sender.credit(message.payload)
                continue
            changed = _feed(follower, message)
            if changed is not None and (not spec.as_json or _reportable(changed, spec.wait)):
                _print(out, changed, spec.as_json)
    for result in follower.targets.values():
        if not result.final and (spec.wait or result.status is None):
            result.timed_out = True
            _print(out, result, spec.as_json)
    ok = follower.ok(spec.wait)
    counts: dict[str, int] = {}
    for r in follower.targets.values():
        key = "timed out" if r.timed_out else (r.status.value if r.status else "no answer")
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no device answered"
    print(f"ota-fleet: job {job.id}: {summary}", file=sys.stderr)
    return 0 if ok else 1


def _reportable(result: DeviceResult, wait: bool) -> bool:
    """--json prints one object per device: its final state (with --wait) or its first answer."""
    return result.final or (not wait and len(result.statuses) == 1)


def _print(out: TextIO, result: DeviceResult, as_json: bool) -> None:
    print(json.dumps(result.to_json(), sort_keys=True) if as_json else result.line(), file=out, flush=True)


def _feed(follower: Follower, message: Message) -> DeviceResult | None:
    try:
        doc = parse_report(message.payload)
    except JobError as e:
        log.debug("ignoring a report on %s: %s", clean(message.topic, 200), e)
        return None
    return follower.feed(doc)


def _members(messages: list[Message], group: str) -> set[str]:
    """Devices whose retained status lists `group`."""
    members = set()
    for message in messages:
        if not message.topic.endswith("/status"):
            continue
        try:
            doc = parse_report(message.payload)
        except JobError:
            continue
        groups = doc.get("groups")
        if isinstance(groups, list) and group in groups:
            members.add(str(doc["device"]))
    return members


def _checked(option: str, name: str) -> str:
    try:
        return check_name(option.lstrip("-"), name)
    except TopicError as e:
        raise FleetError(f"{option}: {e}") from None
