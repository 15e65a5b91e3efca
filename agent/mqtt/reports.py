"""The agent's reports as MQTT documents: outbox records routed to their topic
(the `Route` the reporter publishes with), progress, and the retained status.

- An outbox record of event `job` (`EventType.JOB`, written by the MQTT front
  end for each lifecycle step of a job) goes to `.../jobs/<txn>/status` as a
  job status report (`schema.job_report`): its `result` is the `JobStatus`,
  its `txn` the job id, `bundle_version` and `slot` become `details`, the
  /etc merge's `conflicts` (an install's) the report's `conflicts` list.
- Every other record goes to `.../events` as an event report: the event's
  fields (`event`, `result`, `reason`, `txn`, `bundle_version`, `slot`, `time`,
  `downloaded` and `conflicts` when it has them) with the record's `seq` and
  `id`, and `dropped` when the outbox had to drop reports before it. A `job`
  record that cannot name a job status topic (a foreign or damaged record) is
  published there too, never lost.
- Progress (`.../progress`) is not an outbox record: it is published at QoS 0
  from the job queue's updates, rate-limited by the front end. It carries
  `status: in-progress` and the job id, so it reads like a job report.
- The retained device state (`.../status`) wraps the application's status
  document (the one `ota-agent status --json` prints) as `state`, with the
  device's groups, so the operator side can tell the members of a group.

Record ids and `seq` come from the outbox, so a record delivered twice is the
same document twice (the operator side deduplicates on `id`).

Owns the documents; not the outbox (agent.outbox), not the publishing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from agent.events import EtcConflict, Event, EventType
from agent.jobs import JobView
from agent.mqtt.errors import JobError, TopicError
from agent.mqtt.reporter import Message
from agent.mqtt.schema import SCHEMA_VERSION, JobStatus, Scalar, encode, format_time, job_report, new_report_id
from agent.mqtt.schema import parse_time as parse_wire_time
from agent.mqtt.topics import Topics, check_name
from agent.outbox import Record

GroupOf = Callable[[str], str | None]  # job id -> the group it came through, if the device remembers


def job_event(job_id: str, status: JobStatus, reason: str = "", *, bundle_version: str | None = None,
              slot: str | None = None, conflicts: tuple[EtcConflict, ...] = ()) -> Event:
    """The outbox event that reports one lifecycle step of a job."""
    return Event(event=EventType.JOB, result=status.value, reason=reason, txn=job_id,
                 bundle_version=bundle_version, slot=slot, conflicts=conflicts)


def record_time(event: Event) -> datetime:
    """An event's time as a datetime (now, for a record without a readable one)."""
    try:
        return parse_wire_time("time", event.time)
    except JobError:
        return datetime.now(UTC)


def job_status_report(device: str, record: Record, group: str | None = None) -> dict[str, Any] | None:
    """The job status report of a `job` record, or None when it is not one (or names no job)."""
    event = record.event
    if event.event != EventType.JOB or event.txn is None:
        return None
    try:
        job_id = check_name("job id", event.txn)
        status = JobStatus(event.result)
    except (TopicError, ValueError):
        return None
    details: dict[str, Scalar] = {}
    if event.bundle_version is not None:
        details["bundle_version"] = event.bundle_version
    if event.slot is not None:
        details["slot"] = event.slot
    return job_report(report_id=record.id, device=device, job_id=job_id, status=status, time=record_time(event),
                      reason=event.reason, seq=record.seq, group=group, dropped=record.dropped, details=details,
                      conflicts=[c.to_json() for c in event.conflicts])


def event_report(device: str, record: Record) -> dict[str, Any]:
    """The `.../events` document of any record."""
    event = record.event
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "id": record.id, "device": device, "seq": record.seq,
                           "event": event.event, "result": event.result, "time": event.time}
    for key in ("reason", "txn", "bundle_version", "slot"):
        value = getattr(event, key)
        if value:
            doc[key] = value
    if event.downloaded is not None:
        doc["downloaded"] = event.downloaded
    if event.conflicts:
        doc["conflicts"] = [c.to_json() for c in event.conflicts]
    if record.dropped:
        doc["dropped"] = record.dropped
    return doc


def route(topics: Topics, group_of: GroupOf) -> Callable[[Record], Message]:
    """The reporter's route for this device's outbox."""

    def message(record: Record) -> Message:
        report = job_status_report(topics.device, record)
        if report is not None:
            group = group_of(report["job"])
            if group is not None:
                report["group"] = group
            return Message(topics.job_status(report["job"]), encode(report))
        return Message(topics.events, encode(event_report(topics.device, record)))

    return message


def progress_report(device: str, view: JobView, time: datetime) -> dict[str, Any] | None:
    """The `.../progress` document of a running job's progress, if it has any."""
    p = view.progress
    if p is None:
        return None
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "id": new_report_id(), "device": device,
                           "status": JobStatus.IN_PROGRESS.value, "command": view.command, "origin": view.origin,
                           "time": format_time(time), **p.to_json()}
    try:
        doc["job"] = check_name("job id", view.id)
    except TopicError:
        doc["txn"] = view.id  # a job id from another front end that is no valid topic name
    return doc


def status_state(app_status: Mapping[str, Any]) -> dict[str, Any]:
    """The application's status document without the running job's progress (which has its own
    topic), so the retained message changes only when the device's state does."""
    state = dict(app_status)
    job = state.get("job")
    if isinstance(job, Mapping):
        state["job"] = {k: v for k, v in job.items() if k != "progress"}
    return state


def status_report(device: str, groups: tuple[str, ...], state: Mapping[str, Any], time: datetime) -> dict[str, Any]:
    """The retained `.../status` document."""
    return {"schema": SCHEMA_VERSION, "device": device, "groups": list(groups), "time": format_time(time),
            "state": dict(state)}
