"""The local API's request parsing (every field of a request line is untrusted)
and the rate limit of job updates to one client: pure functions, no sockets."""

from __future__ import annotations

import json

import pytest

from agent import api_protocol as proto
from agent.api_conn import MIN_INTERVAL, JobStream, milestone
from agent.api_protocol import Code, RequestError
from agent.commands import COMMANDS, Reply
from agent.jobs import JobState, JobView, Progress


def parse(doc: object) -> proto.Request:
    return proto.parse(json.dumps(doc).encode())


def code_of(line: bytes) -> Code:
    with pytest.raises(RequestError) as e:
        proto.parse(line)
    return e.value.code


def test_a_request_gets_its_defaults_and_checked_arguments() -> None:
    req = parse({"id": "a", "command": "mark-good"})
    assert (req.id, req.command, req.args, req.follow, req.origin) == (
        "a", COMMANDS["mark-good"], {"slot": "booted", "force": False}, False, "api")


def test_follow_only_applies_to_state_changing_commands() -> None:
    assert parse({"command": "status", "follow": True}).follow is False
    assert parse({"command": "reboot", "follow": True}).follow is True


@pytest.mark.parametrize(("label", "origin"), [("cli", "cli"), ("api", "api"), ("hmi", "api:hmi"),
                                               ("mqtt", "api:mqtt")])
def test_a_client_names_its_origin_but_cannot_pose_as_another_front_end(label: str, origin: str) -> None:
    assert parse({"command": "status", "origin": label}).origin == origin


def test_subscribe_is_a_request_of_its_own() -> None:
    req = parse({"id": 3, "command": "subscribe"})
    assert (req.command, req.follow) == (None, True)


@pytest.mark.parametrize("request_id", [None, 0, -5, "x" * proto.MAX_ID, 2**53 - 1])
def test_ids_that_are_echoed(request_id: object) -> None:
    assert parse({"id": request_id, "command": "status"}).id == request_id


@pytest.mark.parametrize("request_id", [True, 1.5, [], {}, "x" * (proto.MAX_ID + 1), 2**53])
def test_ids_that_are_refused(request_id: object) -> None:
    assert code_of(json.dumps({"id": request_id, "command": "status"}).encode()) is Code.BAD_REQUEST


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"", Code.BAD_JSON),
        (b"{", Code.BAD_JSON),
        (b'{"command": "status"} {}', Code.BAD_JSON),
        (b'{"command": "status", "command": "reboot"}', Code.BAD_JSON),
        (b'{"command": "status", "args": {"a": Infinity}}', Code.BAD_JSON),
        (b'{"command": "st\xc3"}', Code.BAD_JSON),
        (b"[" * 5000 + b"]" * 5000, Code.BAD_JSON),
        (b'{"command": "status", "args": ' + b"[" * 8 + b"]" * 8 + b"}", Code.BAD_REQUEST),
        (b" " * proto.MAX_LINE, Code.LINE_TOO_LONG),
        (b'"status"', Code.BAD_REQUEST),
        (b'{"command": "status", "args": []}', Code.BAD_REQUEST),
        (b'{"command": "status", "args": {"\\u0000": 1}}', Code.BAD_REQUEST),
        (b'{"command": "reboot", "args": {"now": true}}', Code.BAD_ARGS),
        (b'{"command": "mark-good", "args": {"force": "yes"}}', Code.BAD_ARGS),
        (b'{"command": "install", "args": {"source": "./b.otab"}}', Code.BAD_ARGS),
        (b'{"command": "install", "args": {"source": "-"}}', Code.BAD_ARGS),
        (b'{"command": "sim"}', Code.UNKNOWN_COMMAND),
    ],
)
def test_a_bad_line_is_one_request_error(line: bytes, code: Code) -> None:
    assert code_of(line) is code


def test_an_error_keeps_the_id_when_the_line_had_a_valid_one() -> None:
    with pytest.raises(RequestError) as e:
        proto.parse(b'{"id": 42, "command": "nope"}')
    assert e.value.request_id == 42
    doc = proto.error(e.value.request_id, e.value.code, str(e.value))
    assert doc == {"id": 42, "error": {"code": "unknown-command", "message": str(e.value)}}


def test_a_reply_round_trips_to_what_the_cli_prints() -> None:
    sent = Reply("status", True, {"booted": "A"}, "booted A")
    wire = json.loads(proto.encode(proto.reply(1, sent)))["reply"]
    assert proto.reply_from_json(wire) == sent
    failed = Reply("cancel", False, None, "no job is running", error="no job is running", error_type="OtaError")
    assert proto.reply_from_json(json.loads(proto.encode(proto.reply(1, failed)))["reply"]) == failed


def view(state: JobState = JobState.RUNNING, phase: str = "writing", done: int = 0, total: int = 100) -> JobView:
    return JobView("j1", "install", "api", state, Progress(phase, done, total))


def test_a_job_view_round_trips() -> None:
    v = view(done=40)
    assert proto.view_from_json(json.loads(json.dumps(proto.view_json(v)))) == v


def test_progress_is_rate_limited_but_every_milestone_passes_at_once() -> None:
    stream = JobStream(1, None, open=True)
    t = 100.0
    sent = [stream.offer(view(done=d), t) for d in (1, 2, 3, 10, 25, 26, 50, 60, 75, 99, 100)]
    passed = [v.progress.done for v in sent if v is not None and v.progress]
    assert passed == [1, 25, 50, 75, 100]  # the first, then each quarter reached; the rest held back
    assert stream.offer(view(phase="verifying read-back", done=1), t) is not None  # a new phase
    assert stream.offer(view(JobState.SUCCEEDED, "verifying read-back", 1), t) is not None  # a new state


def test_a_held_back_update_is_sent_when_the_interval_is_up() -> None:
    stream = JobStream(1, None, open=True)
    assert stream.offer(view(done=1), 10.0) is not None
    assert stream.offer(view(done=5), 10.05) is None
    assert stream.offer(view(done=7), 10.1) is None
    assert stream.due() == pytest.approx(10.0 + MIN_INTERVAL)
    assert stream.take_due(10.1) is None
    late = stream.take_due(10.0 + MIN_INTERVAL)
    assert late is not None
    assert late.progress is not None
    assert late.progress.done == 7
    assert stream.due() is None


def test_a_milestone_is_the_quarter_of_the_phase() -> None:
    assert [milestone(view(done=d))[3] for d in (0, 24, 25, 74, 75, 100, 130)] == [0, 0, 1, 2, 3, 4, 4]
    assert milestone(view(total=0))[3] == 0
