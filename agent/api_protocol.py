"""The local API's wire format, shared by the server (`agent.api_server`) and the
CLI's client (`agent.api_client`); the reference for people is docs/api.md.

JSON lines over a UNIX stream socket. A request is one JSON object on one line:

    {"id": 7, "command": "install", "args": {"source": "/data/os-2.1.otab"}, "follow": true}

and every answer is one JSON object on one line carrying the request's `id`:

    {"id": 7, "reply": REPLY}        a command ran: `Reply.to_json()` plus its "text"
    {"id": 7, "job": JOB}            a state-changing command was accepted as job JOB (JobView JSON)
    {"id": 7, "progress": JOB}       the followed (or, subscribed, any) job changed
    {"id": 7, "status": STATUS}      subscribed: the device's status changed (`status --json`)
    {"id": 7, "error": ERROR}        the request was not run: {"code", "message", "type"?, "job"?}

Owns parsing and validating a request line (everything in it is untrusted:
bounded length and depth, strict JSON without duplicate keys or NaN, valid
Unicode without NUL, the command's arguments through `check_args`) and building
answers. Owns no sockets.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from agent.commands import COMMANDS, Command, CommandError, Reply, check_args
from agent.jobs import JobState, JobView, Progress
from ota_common import strictjson
from ota_common.errors import OtaError
from ota_common.text import clean

VERSION = 1
MAX_LINE = 64 * 1024  # bytes of one request line, newline included
MAX_ANSWER = 4 << 20  # bytes of one answer line the client reads
MAX_DEPTH = 8  # nesting of a request: object > args > value needs 3
MAX_ID = 128  # characters of a string id
MAX_INT_ID = 1 << 53
SUBSCRIBE = "subscribe"
FIELDS = ("id", "command", "args", "follow", "origin")
_LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


class Code(enum.StrEnum):
    """Why a request was not run: the `code` of an error answer."""

    BAD_JSON = "bad-json"  # not UTF-8, not JSON, a duplicate key, NaN, nested too deeply
    LINE_TOO_LONG = "line-too-long"
    BAD_REQUEST = "bad-request"  # not an object, an unknown field, a field of the wrong type
    UNKNOWN_COMMAND = "unknown-command"
    BAD_ARGS = "bad-args"
    BUSY = "busy"  # a state-changing command while a job runs: "job" names it
    TOO_MANY_CLIENTS = "too-many-clients"
    IDLE_TIMEOUT = "idle-timeout"
    SHUTTING_DOWN = "shutting-down"
    INTERNAL = "internal"


class ApiError(OtaError):
    """The local API cannot be served or reached (socket, permissions, a broken answer)."""


class RequestError(Exception):
    """A request line the server answers with an error object instead of running it."""

    def __init__(self, code: Code, message: str, request_id: object = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Request:
    id: str | int | None
    command: Command | None  # None: subscribe
    args: dict[str, Any]
    follow: bool
    origin: str


def parse(line: bytes) -> Request:
    """One request line (without its newline); RequestError says what is wrong."""
    if len(line) >= MAX_LINE:
        raise RequestError(Code.LINE_TOO_LONG, f"request line longer than {MAX_LINE - 1} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(Code.BAD_JSON, f"not UTF-8 (byte {e.start})") from None
    try:
        doc = strictjson.loads(text)
    except strictjson.StrictJSONError as e:  # not JSON, a duplicate key, NaN, a huge integer, too deep
        raise RequestError(Code.BAD_JSON, f"not JSON: {clean(e, 200)}") from None
    problem = _deep_or_unclean(doc)
    if problem:
        raise RequestError(Code.BAD_REQUEST, problem)
    if not isinstance(doc, dict):
        raise RequestError(Code.BAD_REQUEST, "a request must be a JSON object")
    request_id = doc.get("id")
    if not (request_id is None or (isinstance(request_id, str) and len(request_id) <= MAX_ID)
            or (isinstance(request_id, int) and not isinstance(request_id, bool)
                and abs(request_id) < MAX_INT_ID)):
        raise RequestError(Code.BAD_REQUEST, f"id must be a string of at most {MAX_ID} characters, "
                                             "an integer or null")

    def fail(code: Code, message: str) -> RequestError:
        return RequestError(code, message, request_id)

    unknown = sorted(k for k in doc if k not in FIELDS)
    if unknown:
        raise fail(Code.BAD_REQUEST, f"unknown field {clean(unknown[0], 64)!r} (known: {', '.join(FIELDS)})")
    name = doc.get("command")
    if not isinstance(name, str):
        raise fail(Code.BAD_REQUEST, "command must be a string")
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise fail(Code.BAD_REQUEST, "args must be an object")
    follow = doc.get("follow", False)
    if not isinstance(follow, bool):
        raise fail(Code.BAD_REQUEST, "follow must be true or false")
    label = doc.get("origin", "api")
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise fail(Code.BAD_REQUEST, "origin must be a label of 1..32 characters a-z 0-9 . _ -")
    origin = label if label in ("api", "cli") else f"api:{label}"  # a local client cannot pose as mqtt
    if name == SUBSCRIBE:
        if args:
            raise fail(Code.BAD_ARGS, "subscribe takes no arguments")
        return Request(request_id, None, {}, True, origin)
    command = COMMANDS.get(name)
    if command is None:
        raise fail(Code.UNKNOWN_COMMAND, f"unknown command {clean(name, 64)!r} "
                                         f"(known: {', '.join([*COMMANDS, SUBSCRIBE])})")
    try:
        checked = check_args(command, args)
    except CommandError as e:
        raise fail(Code.BAD_ARGS, str(e)) from None
    if command.name == "install":
        _check_source(checked["source"], fail)
    return Request(request_id, command, checked, follow and command.changes_state, origin)


def _check_source(source: str, fail: Any) -> None:
    """A source means what it says in the daemon's process too: no stdin, no relative path."""
    if source == "-":
        raise fail(Code.BAD_ARGS, "install: source '-' (stdin) is the CLI's own standard input; "
                                  "send a file path or an http(s) URL")
    if "://" not in source and not PurePosixPath(source).is_absolute():
        raise fail(Code.BAD_ARGS, "install: a file source must be an absolute path (the agent does not "
                                  "share your working directory)")


def _deep_or_unclean(doc: object) -> str | None:
    """Nesting beyond MAX_DEPTH, or a string (key or value) with NUL or a lone surrogate."""
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                return f"request nested deeper than {MAX_DEPTH} levels"
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str):
            if "\0" in value:
                return "a string holds a NUL character"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone surrogate (not valid Unicode)"
    return None


# --- answers ---------------------------------------------------------------------


def encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=False).encode() + b"\n"


def error(request_id: object, code: Code, message: str, **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": code.value, "message": clean(message), **extra}}


def reply(request_id: object, r: Reply) -> dict[str, Any]:
    return {"id": request_id, "reply": {**r.to_json(), "text": r.text}}


def view_json(view: JobView) -> dict[str, Any]:
    """A job as JSON, its result in the command's own JSON form."""
    doc = view.to_json()
    command = COMMANDS.get(view.command)
    if view.state is JobState.SUCCEEDED and view.result is not None and command is not None:
        doc["result"] = command.to_json(view.result)
    elif not isinstance(doc["result"], dict | list | str | int | float | bool | None):
        doc["result"] = None
    return doc


# --- the client's side -----------------------------------------------------------


def reply_from_json(doc: object) -> Reply:
    """A `Reply` from its wire form; ApiError when the daemon's answer is not one."""
    if not (isinstance(doc, dict) and isinstance(doc.get("command"), str) and isinstance(doc.get("ok"), bool)):
        raise ApiError(f"unexpected reply from the agent: {clean(doc, 200)}")
    err = doc.get("error")
    text = doc.get("text", "")
    if isinstance(err, dict):
        return Reply(doc["command"], False, None, str(text), error=str(err.get("message")),
                     error_type=str(err.get("type") or "OtaError"))
    result = doc.get("result")
    return Reply(doc["command"], doc["ok"], result if isinstance(result, dict) else None, str(text))


def view_from_json(doc: object) -> JobView:
    """A `JobView` from its wire form (result kept as JSON); ApiError when it is not one."""
    try:
        assert isinstance(doc, dict)
        p = doc.get("progress")
        progress = None
        if isinstance(p, dict):
            progress = Progress(str(p["phase"]), int(p["done"]), int(p["total"]),
                                None if p.get("eta_seconds") is None else float(p["eta_seconds"]))
        return JobView(str(doc["id"]), str(doc["command"]), str(doc["origin"]), JobState(doc["state"]),
                       progress, doc.get("result"), doc.get("error"), doc.get("error_type"))
    except (AssertionError, KeyError, TypeError, ValueError):
        raise ApiError(f"unexpected job from the agent: {clean(doc, 200)}") from None
