"""The job journal: durable across a restart, deduplicating, bounded, with a
watermark for forgotten jobs, and crash-safe (a torn tail is cut off and the
journal keeps working)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.mqtt.errors import JournalError, TransitionError
from agent.mqtt.journal import Journal
from agent.mqtt.schema import Job, JobStatus, JobType

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = T0 + timedelta(days=1)) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def job(n: int, kind: JobType = JobType.REBOOT, created: datetime | None = None) -> Job:
    url = "https://h/b.otab" if kind is JobType.INSTALL else None
    return Job(id=f"job-{n}", type=kind, created=created or T0 + timedelta(minutes=n), url=url)


def test_an_admitted_job_and_its_status_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path, clock=Clock())
    record, new = j.admit(job(1, JobType.INSTALL))
    assert new
    assert record.status is JobStatus.QUEUED
    j.set_status("job-1", JobStatus.IN_PROGRESS)
    j.set_status("job-1", JobStatus.INSTALLED, "written and read back")
    again = Journal(path, clock=Clock()).get("job-1")
    assert again is not None
    assert again.job == job(1, JobType.INSTALL)
    assert (again.status, again.reason) == (JobStatus.INSTALLED, "written and read back")
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_known_id_is_not_admitted_twice(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", clock=Clock())
    j.admit(job(1))
    j.set_status("job-1", JobStatus.IN_PROGRESS)
    record, new = j.admit(job(1))
    assert not new
    assert record.status is JobStatus.IN_PROGRESS


def test_forbidden_transitions_and_unknown_jobs_are_errors_that_change_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", clock=Clock())
    j.admit(job(1, JobType.INSTALL))
    j.set_status("job-1", JobStatus.IN_PROGRESS)
    with pytest.raises(TransitionError, match="cannot go from in-progress to succeeded"):
        j.set_status("job-1", JobStatus.SUCCEEDED)  # an install must be "installed" first
    with pytest.raises(JournalError, match="job-9 is not in the journal"):
        j.set_status("job-9", JobStatus.FAILED)
    record = Journal(tmp_path / "j", clock=Clock()).get("job-1")
    assert record is not None
    assert record.status is JobStatus.IN_PROGRESS


def test_repeating_the_same_status_is_a_no_op(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", clock=Clock())
    j.admit(job(1))
    j.set_status("job-1", JobStatus.IN_PROGRESS)
    size = (tmp_path / "j").stat().st_size
    j.set_status("job-1", JobStatus.IN_PROGRESS)
    assert (tmp_path / "j").stat().st_size == size


@pytest.mark.parametrize("cut", [1, 4, 9, 20])
def test_a_torn_last_record_is_cut_off_and_the_journal_keeps_working(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "j"
    j = Journal(path, clock=Clock())
    j.admit(job(1))
    good = path.stat().st_size
    j.admit(job(2))
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - cut)  # a power cut in the middle of appending job-2
    j2 = Journal(path, clock=Clock())
    assert j2.get("job-1") is not None
    assert j2.get("job-2") is None
    assert path.stat().st_size == good
    j2.admit(job(3))
    assert [r.id for r in Journal(path, clock=Clock()).records()] == ["job-1", "job-3"]


def test_a_last_record_with_a_bad_checksum_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path, clock=Clock())
    j.admit(job(1))
    j.admit(job(2))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    assert [r.id for r in Journal(path, clock=Clock()).records()] == ["job-1"]


def test_it_remembers_the_last_n_jobs_and_raises_the_watermark_past_forgotten_ones(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path, capacity=8, clock=Clock())
    for n in range(50):
        j.admit(job(n))
        j.set_status(f"job-{n}", JobStatus.IN_PROGRESS)
        j.set_status(f"job-{n}", JobStatus.SUCCEEDED)
    assert [r.id for r in j.records()] == [f"job-{n}" for n in range(42, 50)]
    assert j.watermark == T0 + timedelta(minutes=41)
    assert j.out_of_date(T0 + timedelta(minutes=3))  # job-3 replayed: forgotten, refused as out of date
    assert not j.out_of_date(T0 + timedelta(minutes=42))
    # compaction keeps the file to about 3 records per remembered job, not 150 records
    assert path.stat().st_size < (3 * 8 + 16) * 200
    reloaded = Journal(path, capacity=8, clock=Clock())
    assert [r.id for r in reloaded.records()] == [r.id for r in j.records()]
    assert reloaded.watermark == j.watermark


def test_unfinished_jobs_are_forgotten_last(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", capacity=8, clock=Clock())
    j.admit(job(0, JobType.INSTALL))
    j.set_status("job-0", JobStatus.IN_PROGRESS)
    for n in range(1, 20):
        j.admit(job(n))
        j.set_status(f"job-{n}", JobStatus.IN_PROGRESS)
        j.set_status(f"job-{n}", JobStatus.SUCCEEDED)
    assert j.get("job-0") is not None
    assert [r.id for r in j.unfinished()] == ["job-0"]


def test_a_forgotten_job_from_a_clock_far_ahead_is_never_run_twice(tmp_path: Path) -> None:
    ahead = T0 + timedelta(days=365)
    j = Journal(tmp_path / "j", capacity=8, clock=Clock(T0))
    j.admit(job(0, created=ahead))  # stamped by an operator clock a year ahead
    for n in range(1, 10):
        j.admit(job(n))
    assert j.get("job-0") is None
    assert j.watermark == ahead
    assert j.out_of_date(ahead)  # its replay is refused as out of date ...
    assert j.out_of_date(T0 + timedelta(minutes=20))  # ... and so, loudly, is anything stamped before it


def test_a_journal_that_cannot_be_written_refuses_and_remembers_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", clock=Clock())
    (tmp_path / "j").mkdir()  # the path turned into something no record can be appended to
    with pytest.raises(JournalError, match="cannot write the job journal"):
        j.admit(job(1))
    assert j.get("job-1") is None
