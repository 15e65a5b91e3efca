"""The CLI's side of the local API: send one command of the table to a running
`ota-agent run` and get back the same `Reply` the command gives in-process,
with the job's progress on the way (wire format: `agent.api_protocol`).

`Session.open(config)` is None when no daemon serves the socket (no socket
file, a stale one left by a crash, API disabled): the CLI then runs the
command itself. A state-changing command is followed to its end; Ctrl-C while
it runs asks the daemon to cancel it at its next safe point (a second Ctrl-C
stops waiting). Owns no rendering: the CLI prints the Reply.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from agent.api_protocol import MAX_ANSWER, ApiError, reply_from_json, view_from_json
from agent.api_socket import connect
from agent.commands import Reply
from agent.config import ApiConfig
from agent.jobs import JobView
from ota_common.errors import OtaError
from ota_common.text import clean

CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 60.0  # for a request's first answer; a followed job may then take as long as it takes


class RemoteError(OtaError):
    """The daemon did not run the request (busy, bad arguments, ...) or the command
    failed there; `kind` is the error's type name, as the in-process command names it."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Session:
    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._path = path
        self._next_id = 0

    @classmethod
    def open(cls, config: ApiConfig) -> Session | None:
        if not config.enabled:
            return None
        sock = connect(config.socket, CONNECT_TIMEOUT)
        return None if sock is None else cls(sock, str(config.socket))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def call(self, command: str, args: dict[str, Any], *,
             on_progress: Callable[[JobView], None] | None = None, starts_job: bool = False) -> Reply:
        """Run `command` in the daemon; a state-changing one is followed to its reply.
        With `starts_job`, a Ctrl-C that comes before the daemon named the job is
        not lost: the cancel is sent as soon as the job's id arrives."""
        request_id = self._send(command, args, follow=True)
        job: str | None = None
        canceling = False
        self._sock.settimeout(ANSWER_TIMEOUT)
        while True:
            try:
                answer = self._answer(job)
            except KeyboardInterrupt:
                if job is None and not starts_job:
                    raise
                if canceling:
                    raise ApiError(f"stopped waiting; the agent is canceling job {job} "
                                   f"(`ota-agent job {job}` tells how it ended)" if job else
                                   "stopped waiting before the agent named the job (`ota-agent status` tells "
                                   "whether it runs)") from None
                canceling = True
                if job is not None:
                    self._cancel(job)
                continue
            if answer.get("id") != request_id:
                continue  # the answer to our cancel request: the job's own reply follows
            if "reply" in answer:
                return reply_from_json(answer["reply"])
            if "error" in answer:
                err = answer["error"]
                message = str(err.get("message")) if isinstance(err, dict) else str(err)
                kind = err.get("type") if isinstance(err, dict) else None
                raise RemoteError(message, str(kind or "OtaError"))
            if "job" in answer:
                job = view_from_json(answer["job"]).id
                self._sock.settimeout(None)
                if canceling:  # Ctrl-C came while the request was on its way
                    self._cancel(job)
            elif "progress" in answer and on_progress is not None:
                on_progress(view_from_json(answer["progress"]))

    def _cancel(self, job: str) -> None:
        print(f"ota-agent: canceling job {job} at its next safe point (Ctrl-C again to stop waiting)",
              file=sys.stderr, flush=True)
        self._send("cancel", {"job": job}, follow=False)

    def _send(self, command: str, args: dict[str, Any], *, follow: bool) -> int:
        self._next_id += 1
        line = json.dumps({"id": self._next_id, "command": command, "args": args, "follow": follow,
                           "origin": "cli"})
        try:
            self._sock.sendall(line.encode() + b"\n")
        except OSError as e:
            raise ApiError(f"cannot send to the agent at {self._path}: {e.strerror}") from None
        return self._next_id

    def _answer(self, job: str | None) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_ANSWER + 1)
        except TimeoutError:
            raise ApiError(f"no answer from the agent at {self._path} in {ANSWER_TIMEOUT:g} s") from None
        except OSError as e:
            line = b""
            if not isinstance(e, ConnectionResetError):
                raise ApiError(f"reading from the agent at {self._path}: {e.strerror}") from None
        if not line.endswith(b"\n"):
            if len(line) > MAX_ANSWER:
                raise ApiError(f"an answer from the agent longer than {MAX_ANSWER} bytes")
            during = f" while job {job} ran (`ota-agent job {job}` or `status` tells how it ended)" if job else ""
            raise ApiError(f"the agent at {self._path} closed the connection{during}")
        try:
            doc = json.loads(line)
        except ValueError:
            raise ApiError(f"unexpected answer from the agent: {clean(line, 200)}") from None
        if not isinstance(doc, dict):
            raise ApiError(f"unexpected answer from the agent: {clean(line, 200)}")
        return doc
