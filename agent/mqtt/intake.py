"""Incoming jobs: from an MQTT message to an answered, journalled job handed
to the application.

`JobIntake.handle(topic, payload)` runs in the MQTT network thread, inside the
message callback, and returns before the link sends the PUBACK. In order:

1. the topic names one of this device's (or its groups') job topics, else the
   message is ignored;
2. `schema.parse_job` validates the document (bounded, strict); a violation is
   answered "rejected" with the parser's one-line reason, not journalled;
3. a job id the journal knows is a replay: answered with its recorded status
   (`duplicate: true`), never handed on again;
4. a job created at or before the journal's watermark is out of date (it may
   be one the journal forgot): answered "rejected", not run;
5. the job is journalled (fsynced) - as "rejected" if it has expired, else as
   "queued" - and only then handed to the `JobSink`; a sink that is busy or
   refuses turns the entry "rejected" with its reason;
6. the answer is published on `.../jobs/<id>/status`.

If the device dies between step 5 and the PUBACK, the broker redelivers the
job (persistent session) and step 3 absorbs it; a job journalled "queued" but
never run is handed to the sink again by `resume()` at start.

The sink contract (the application layer implements it): `submit` returns at
once (it queues; it does not run the job in the caller's thread), and the
application moves the job on with `Journal.set_status` *before* it acts
(in-progress before installing or rebooting), so a job is never run twice.

Owns the decision per message; not the connection (link.py), not the journal's storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from agent.crashpoint import crashpoint
from agent.mqtt.errors import JobError, JournalError, TopicError, TransitionError
from agent.mqtt.journal import Clock, JobRecord, Journal
from agent.mqtt.schema import Job, JobStatus, encode, format_time, job_report, new_report_id, parse_job
from agent.mqtt.topics import JobTopic, Topics
from ota_common.text import clean

log = logging.getLogger(__name__)


class AnswerKind(Enum):
    QUEUED = "queued"
    BUSY = "busy"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class JobAnswer:
    """The application's answer to a submitted job."""

    kind: AnswerKind
    reason: str = ""
    running: str | None = None  # BUSY: the id of the job that is running

    @classmethod
    def queued(cls) -> JobAnswer:
        return cls(AnswerKind.QUEUED)

    @classmethod
    def busy(cls, running: str) -> JobAnswer:
        return cls(AnswerKind.BUSY, f"busy: job {running} is running", running)

    @classmethod
    def rejected(cls, reason: str) -> JobAnswer:
        return cls(AnswerKind.REJECTED, reason)


class JobSink(Protocol):
    """Where accepted jobs go (the application's job queue). Called from the MQTT network
    thread: must return promptly."""

    def submit(self, job: Job) -> JobAnswer: ...


class Outcome(Enum):
    IGNORED = "ignored"  # not a job topic of this device
    REFUSED = "refused"  # malformed or schema-violating: answered, not journalled
    DUPLICATE = "duplicate"  # known id: answered with the recorded status
    OUT_OF_DATE = "out-of-date"  # older than the watermark: answered, not journalled
    EXPIRED = "expired"  # journalled as rejected
    SUBMITTED = "submitted"  # journalled and handed to the sink (which may have refused it)


@dataclass(frozen=True, slots=True)
class Handled:
    outcome: Outcome
    job_id: str | None = None
    status: JobStatus | None = None
    reason: str = ""


Publish = Callable[[str, bytes], None]


class JobIntake:
    def __init__(
        self,
        topics: Topics,
        journal: Journal,
        sink: JobSink,
        publish: Publish,
        *,
        groups: tuple[str, ...] = (),
        clock: Clock,
    ) -> None:
        self.topics = topics
        self.journal = journal
        self.sink = sink
        self.publish = publish
        self.groups = groups
        self.clock = clock

    @property
    def filters(self) -> list[str]:
        """The subscriptions that bring this device its jobs."""
        return [self.topics.jobs_filter, *(self.topics.group_jobs_filter(g) for g in self.groups)]

    def handle(self, topic: str, payload: bytes) -> Handled:
        try:
            where = self.topics.parse_job_topic(topic, self.groups)
        except TopicError as e:
            self._refuse_unroutable(topic, str(e))
            return Handled(Outcome.REFUSED, reason=str(e))
        if where is None:
            log.info("mqtt: ignoring a message on %s", clean(topic, 200))
            return Handled(Outcome.IGNORED)
        try:
            job = parse_job(payload, where.job_id)
        except JobError as e:
            log.warning("mqtt: job %s rejected: %s", where.job_id, e)
            self._answer(where, JobStatus.REJECTED, str(e))
            return Handled(Outcome.REFUSED, where.job_id, JobStatus.REJECTED, str(e))
        known = self.journal.get(job.id)
        if known is not None:
            return self._duplicate(where, known)
        if self.journal.out_of_date(job.created):
            mark = self.journal.watermark
            reason = (f"out of date: created {format_time(job.created)}, at or before "
                      f"{format_time(mark) if mark else '?'}, the oldest job this device still remembers")
            log.warning("mqtt: job %s rejected: %s", job.id, reason)
            self._answer(where, JobStatus.REJECTED, reason)
            return Handled(Outcome.OUT_OF_DATE, job.id, JobStatus.REJECTED, reason)
        now = self.clock()
        expired = job.expired(now)
        reason = f"expired at {format_time(job.expires)} (device time {format_time(now)})" if job.expires else ""
        try:
            record, new = self.journal.admit(
                job, status=JobStatus.REJECTED if expired else JobStatus.QUEUED,
                reason=reason if expired else "", group=where.group)
        except JournalError as e:
            log.error("mqtt: job %s rejected: %s", job.id, e)
            self._answer(where, JobStatus.REJECTED, f"cannot journal the job: {e}")
            return Handled(Outcome.REFUSED, job.id, JobStatus.REJECTED, str(e))
        if not new:
            return self._duplicate(where, record)
        if expired:
            log.warning("mqtt: job %s rejected: %s", job.id, reason)
            self._answer(where, JobStatus.REJECTED, reason)
            return Handled(Outcome.EXPIRED, job.id, JobStatus.REJECTED, reason)
        crashpoint("mqtt-job-journalled")
        record, running = self._submit(record)
        crashpoint("mqtt-job-answered")
        log.info("mqtt: job %s (%s%s): %s%s", job.id, job.type.value,
                 f", group {where.group}" if where.group else "", record.status.value,
                 f" - {record.reason}" if record.reason else "")
        self._answer(where, record.status, record.reason, running=running)
        return Handled(Outcome.SUBMITTED, job.id, record.status, record.reason)

    def resume(self) -> list[JobRecord]:
        """At start, before the link connects: hand every job journalled "queued" (accepted,
        never started) to the sink again, answering those it now refuses. Returns the jobs
        that had started (in-progress, installed) for the application to settle."""
        started = []
        for record in self.journal.unfinished():
            if record.status is not JobStatus.QUEUED:
                started.append(record)
                continue
            after, running = self._submit(record)
            if after.status is not JobStatus.QUEUED:
                self._answer(JobTopic(record.id, record.group), after.status, after.reason, running=running)
        return started

    def _submit(self, record: JobRecord) -> tuple[JobRecord, str | None]:
        """Hand a journalled job to the sink: its record afterwards, and the running job's id if busy."""
        try:
            answer = self.sink.submit(record.job)
        except Exception as e:
            log.exception("mqtt: the job sink failed on job %s", record.id)
            answer = JobAnswer.rejected(f"internal error: {clean(e)}")
        if answer.kind is AnswerKind.QUEUED:
            return self.journal.get(record.id) or record, None  # the application may have moved it on already
        try:
            after = self.journal.set_status(record.id, JobStatus.REJECTED, answer.reason or answer.kind.value)
        except (JournalError, TransitionError) as e:
            log.error("mqtt: cannot record the refusal of job %s: %s", record.id, e)
            after = self.journal.get(record.id) or record
        return after, answer.running

    def _duplicate(self, where: JobTopic, known: JobRecord) -> Handled:
        log.info("mqtt: job %s is a replay; answering its recorded status %s", known.id, known.status.value)
        self._answer(where, known.status, known.reason, duplicate=True)
        return Handled(Outcome.DUPLICATE, known.id, known.status, known.reason)

    def _answer(self, where: JobTopic, status: JobStatus, reason: str, *, duplicate: bool = False,
                running: str | None = None) -> None:
        doc = job_report(report_id=new_report_id(), device=self.topics.device, job_id=where.job_id, status=status,
                         time=self.clock(), reason=reason, duplicate=duplicate, group=where.group, running=running)
        self._send(self.topics.job_status(where.job_id), encode(doc))

    def _refuse_unroutable(self, topic: str, reason: str) -> None:
        """A job whose topic carries an unusable id: answered on the device's events topic."""
        log.warning("mqtt: refusing a job on %s: %s", clean(topic, 200), reason)
        doc = {"schema": 1, "id": new_report_id(), "device": self.topics.device, "event": "job-refused",
               "result": "rejected", "reason": clean(reason), "topic": clean(topic, 200),
               "time": format_time(self.clock())}
        self._send(self.topics.events, encode(doc))

    def _send(self, topic: str, payload: bytes) -> None:
        try:
            self.publish(topic, payload)
        except Exception as e:  # an answer lost here is given again when the job is replayed
            log.error("mqtt: cannot publish an answer on %s: %s", clean(topic, 200), clean(e))

