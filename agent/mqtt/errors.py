"""Errors of the MQTT protocol layer (all rooted at `OtaError`, so every message
is one bounded line already).

    OtaError (bundler.format.errors)
    +-- JobError          a job the device refuses: malformed, oversized, schema-violating,
    |                     out of date. The message is the reason the device answers with
    |                     (job status "rejected").
    +-- TopicError        a device id, group name, job id or topic prefix that cannot be
    |                     used in a topic (wildcards, '/', too long, bad characters)
    +-- TransitionError   a job status change the lifecycle does not allow
    |                     (e.g. succeeded -> in-progress); a bug in the caller
    +-- JournalError      the job journal cannot be written (disk full, I/O error) or does
                          not know the job; the job is then refused, never run unrecorded
"""

from __future__ import annotations

from ota_common.errors import OtaError


class JobError(OtaError):
    """A job document the device refuses; `field` names the offending key ("" for the whole document)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class TopicError(OtaError):
    """A name that cannot be a topic level (or a prefix that cannot start a topic)."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what


class TransitionError(OtaError):
    """A job status change the lifecycle forbids."""

    def __init__(self, job_id: str, old: str, new: str) -> None:
        super().__init__(f"job {job_id}: cannot go from {old} to {new}")
        self.job_id = job_id
        self.old = old
        self.new = new


class JournalError(OtaError):
    """The job journal could not record a change; nothing was changed in memory either."""
