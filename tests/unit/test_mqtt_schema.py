"""Job documents: a valid one becomes a typed Job; every malformed, oversized
or schema-violating one is a specific one-line JobError (the reason the device
answers with), and nothing else ever escapes the parser. The lifecycle allows
only the transitions of AWS IoT Jobs plus the two-phase install truth."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.mqtt.errors import JobError
from agent.mqtt.schema import (
    MAX_JOB_BYTES,
    Job,
    JobStatus,
    JobType,
    encode,
    job_document,
    job_report,
    parse_job,
    parse_report,
    presence_report,
)
from ota_common.errors import OtaError

T0 = "2026-05-01T12:00:00Z"


def doc(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"schema": 1, "id": "job-1", "type": "install", "created": T0,
                            "url": "https://bundles.example/os-2.otab"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def raw(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()


def test_an_install_job_becomes_a_typed_value() -> None:
    job = parse_job(raw(doc(expires="2026-05-02T12:00:00+00:00", allow_downgrade=True)), "job-1")
    assert job == Job(id="job-1", type=JobType.INSTALL, created=datetime(2026, 5, 1, 12, tzinfo=UTC),
                      expires=datetime(2026, 5, 2, 12, tzinfo=UTC), url="https://bundles.example/os-2.otab",
                      allow_downgrade=True)
    assert not job.expired(datetime(2026, 5, 2, 11, 59, tzinfo=UTC))
    assert job.expired(datetime(2026, 5, 2, 12, tzinfo=UTC))


@pytest.mark.parametrize(
    "d",
    [
        doc(),
        doc(type="install-stream", url=..., size=123456, sha256="ab" * 32, chunk_size=4096),
        doc(type="cancel", url=..., target="job-0"),
        *(doc(type=t, url=...) for t in ("reboot", "mark-good", "rollback", "status")),
    ],
)
def test_every_job_type_round_trips_through_its_wire_form(d: dict[str, Any]) -> None:
    job = parse_job(raw(d))
    assert parse_job(encode(job_document(job))) == job


BAD: list[tuple[bytes, str]] = [
    (b"", "job is empty"),
    (b" " * (MAX_JOB_BYTES + 1), f"more than the {MAX_JOB_BYTES} allowed"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"{", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got an array"),
    (b'"install"', "must be a JSON object, got a string"),
    (b'{"schema": 1, "schema": 1}', "'schema' appears twice"),
    (b'{"schema": NaN}', "NaN is not a JSON number"),
    (b'{"schema": 1.0}', "1.0 is not an integer"),
    (b'{"schema": 1e3}', "is not an integer"),
    (b'{"schema": ' + b"9" * 30 + b"}", "longer than the 20 allowed"),
    (b"[" * 5000 + b"]" * 5000, ""),  # nested too deeply or not an object: either way a JobError
    (raw(doc(schema=...)), "schema: is required"),
    (raw(doc(schema="1")), "schema: must be the integer 1, got '1'"),
    (raw(doc(schema=True)), "schema: must be the integer 1, got true"),
    (raw(doc(schema=2)), "schema: version 2 is not supported"),
    (raw(doc(type=...)), "type: is required"),
    (raw(doc(type="format-disk")), "'format-disk' is not a job type"),
    (raw(doc(extra=1)), "unknown key 'extra' for a install job"),
    (raw(doc(type="reboot")), "unknown key 'url' for a reboot job"),
    (raw(doc(url=...)), "url: is required for a install job"),
    (raw(doc(id="a/b")), "id: 'a/b' is not a valid name"),
    (raw(doc(id="+")), "id: '+' is not a valid name"),
    (raw(doc(id=5)), "id: must be a string"),
    (raw(doc(created="yesterday")), "created: 'yesterday' is not an ISO 8601 time"),
    (raw(doc(created="2026-05-01T12:00:00")), "created: '2026-05-01T12:00:00' has no time zone"),
    (raw(doc(created=1714564800)), "created: must be an ISO 8601 time"),
    (raw(doc(created="2026-05-01T12:00:00Z" + " " * 50)), "created: must be an ISO 8601 time"),
    (raw(doc(expires=T0)), "expires: 2026-05-01T12:00:00Z is not after created"),
    (raw(doc(url="ftp://h/x")), "url: scheme 'ftp' is not http or https"),
    (raw(doc(url="https://user:pw@h/x")), "url: credentials in the URL are refused"),
    (raw(doc(url="https://h/a b")), "url: must be printable ASCII without spaces"),
    (raw(doc(url="https://h/" + "a" * 3000)), "url: is 3010 characters"),
    (raw(doc(url="https:///x")), "has no host"),
    (raw(doc(url="https://h:99999/x")), "is not a URL"),
    (raw(doc(url=None)), "url: must be a non-empty string, got null"),
    (raw(doc(allow_downgrade="yes")), "allow_downgrade: must be true or false"),
    (raw(doc(type="cancel", url=..., target="job-1")), "target: a job cannot cancel itself"),
    (raw(doc(type="cancel", url=...)), "target: is required for a cancel job"),
    (raw(doc(type="install-stream", url=..., size=1, sha256="AB" * 32)), "sha256: must be 64 lowercase hex"),
    (raw(doc(type="install-stream", url=..., size=0, sha256="ab" * 32)), "size: 0 is outside"),
    (raw(doc(type="install-stream", url=..., size=1, sha256="ab" * 32, chunk_size=1 << 20)), "chunk_size:"),
    (raw(doc(type="install-stream", url=..., size=True, sha256="ab" * 32)), "size: must be an integer"),
]


@pytest.mark.parametrize(("payload", "reason"), BAD, ids=[r or "deep" for _, r in BAD])
def test_malformed_oversized_and_schema_violating_jobs_get_a_specific_one_line_reason(
    payload: bytes, reason: str
) -> None:
    with pytest.raises(JobError) as info:
        parse_job(payload)
    message = str(info.value)
    assert reason in message
    assert "\n" not in message
    assert len(message) <= 600
    assert isinstance(info.value, OtaError)


def test_a_document_whose_id_differs_from_its_topic_is_refused() -> None:
    with pytest.raises(JobError, match="id: 'job-1' differs from the job id 'job-2' in the topic"):
        parse_job(raw(doc()), "job-2")


def test_a_foreign_key_full_of_control_characters_is_shown_as_one_bounded_line() -> None:
    key = "\x1b[2J\nFAKE LOG LINE " + "k" * 5000
    with pytest.raises(JobError) as info:
        parse_job(raw(doc(**{key: 1})))
    assert "\n" not in str(info.value)
    assert "\x1b" not in str(info.value)
    assert len(str(info.value)) < 600


def outcome(payload: bytes) -> Job | JobError:
    """What parsing gives: a Job or a JobError; any other exception escapes and fails the test."""
    try:
        return parse_job(payload)
    except JobError as e:
        return e


def assert_job_or_one_line_error(result: Job | JobError) -> None:
    if isinstance(result, JobError):
        assert "\n" not in str(result)
        assert 0 < len(str(result)) <= 600
    else:
        assert parse_job(encode(job_document(result))) == result


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_a_job_or_a_job_error_and_nothing_else(payload: bytes) -> None:
    assert_job_or_one_line_error(outcome(payload))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["schema", "id", "type", "created", "expires", "url", "allow_downgrade",
                                        "target", "size", "sha256", "chunk_size", "x"]), json_values))
def test_arbitrary_json_objects_are_a_job_or_a_job_error_and_nothing_else(d: dict[str, Any]) -> None:
    assert_job_or_one_line_error(outcome(raw(d)))


S = JobStatus
T = JobType


def test_an_install_succeeds_only_through_installed() -> None:
    assert S.IN_PROGRESS.can_follow(S.QUEUED, T.INSTALL)
    assert S.INSTALLED.can_follow(S.IN_PROGRESS, T.INSTALL)
    assert S.SUCCEEDED.can_follow(S.INSTALLED, T.INSTALL)
    assert S.ROLLED_BACK.can_follow(S.INSTALLED, T.INSTALL_STREAM)
    assert not S.SUCCEEDED.can_follow(S.IN_PROGRESS, T.INSTALL)
    assert not S.SUCCEEDED.can_follow(S.IN_PROGRESS, T.INSTALL_STREAM)


def test_other_jobs_succeed_from_in_progress_and_are_never_installed() -> None:
    assert S.SUCCEEDED.can_follow(S.IN_PROGRESS, T.REBOOT)
    assert not S.INSTALLED.can_follow(S.IN_PROGRESS, T.REBOOT)
    assert not S.ROLLED_BACK.can_follow(S.IN_PROGRESS, T.ROLLBACK)


@pytest.mark.parametrize("final", [s for s in JobStatus if s.terminal])
def test_a_terminal_status_never_changes(final: JobStatus) -> None:
    assert not any(new.can_follow(final, t) for new in JobStatus for t in JobType)


def test_queued_jobs_can_be_refused_canceled_or_time_out_but_not_skip_ahead() -> None:
    for new in (S.IN_PROGRESS, S.REJECTED, S.CANCELED, S.TIMED_OUT, S.FAILED):
        assert new.can_follow(S.QUEUED, T.INSTALL)
    assert not S.SUCCEEDED.can_follow(S.QUEUED, T.REBOOT)
    assert not S.INSTALLED.can_follow(S.QUEUED, T.INSTALL)


def test_reports_carry_foreign_text_as_one_bounded_line() -> None:
    report = job_report(report_id="r1", device="gw-1", job_id="j1", status=S.FAILED,
                        time=datetime(2026, 5, 1, tzinfo=UTC), reason="server said:\nFAKE\x1b" + "x" * 5000,
                        details={"note\n": "a\nb", "n": 3}, seq=9, dropped=2)
    assert "\n" not in report["reason"]
    assert len(report["reason"]) <= 300
    assert report["details"] == {"note\\n": "a\\nb", "n": 3}
    back = parse_report(encode(report))
    assert back["status"] == "failed"
    assert back["seq"] == 9
    assert back["dropped"] == 2


def test_the_last_will_is_told_apart_from_a_clean_offline_by_its_missing_time() -> None:
    will = encode(presence_report("gw-1", False))
    clean_stop = encode(presence_report("gw-1", False, datetime(2026, 5, 1, tzinfo=UTC)))
    assert will == b'{"device":"gw-1","online":false,"schema":1}'
    assert will != clean_stop


def test_a_started_job_may_still_be_refused_but_an_installed_one_may_not() -> None:
    """in-progress -> rejected: the device refused the bundle (signature, policy) before writing."""
    assert S.REJECTED.can_follow(S.IN_PROGRESS, T.INSTALL)
    assert S.REJECTED.can_follow(S.IN_PROGRESS, T.ROLLBACK)
    assert not S.REJECTED.can_follow(S.INSTALLED, T.INSTALL)
