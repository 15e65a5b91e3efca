"""Ctrl-C of a CLI command the daemon runs as a job is never lost, even when it
comes before the daemon's answer naming the job has been read: the client
sends the cancel as soon as the id arrives. The daemon side is a peer on a
real socket pair that speaks the wire protocol (agent.api_protocol) and
interrupts the client at the exact moment under test (a real daemon cannot be
held between accepting a request and naming its job)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.api_client import Session
from agent.api_protocol import encode

JOB = {"id": "7f3a", "command": "install", "origin": "cli", "state": "in-progress", "progress": None}


def peer(sock: socket.socket, script: Callable[[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]], None],
         seen: list[dict[str, Any]]) -> threading.Thread:
    stream = sock.makefile("rb")

    def receive() -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(stream.readline())
        seen.append(doc)
        return doc

    def send(doc: dict[str, Any]) -> None:
        sock.sendall(encode(doc))

    t = threading.Thread(target=script, args=(receive, send), daemon=True)
    t.start()
    return t


def interrupt_the_client() -> None:
    time.sleep(0.5)  # the client is blocked reading the daemon's first answer by now
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)


def test_ctrl_c_before_the_job_is_named_cancels_it_once_the_id_arrives(capsys: pytest.CaptureFixture[str]) -> None:
    ours, theirs = socket.socketpair()
    seen: list[dict[str, Any]] = []

    def daemon(receive: Callable[[], dict[str, Any]], send: Callable[[dict[str, Any]], None]) -> None:
        request = receive()
        interrupt_the_client()
        send({"id": request["id"], "job": JOB})
        cancel = receive()
        send({"id": cancel["id"], "reply": {"command": "cancel", "ok": True, "result": {}, "text": "canceling"}})
        canceled = {"code": "failed", "message": "job 7f3a canceled", "type": "CanceledError"}
        send({"id": request["id"], "error": canceled})

    thread = peer(theirs, daemon, seen)
    with Session(ours, "test.sock") as session, pytest.raises(Exception, match="job 7f3a canceled") as raised:
        session.call("install", {"source": "http://h/b.otab"}, starts_job=True)
    thread.join(5)
    theirs.close()
    assert type(raised.value).__name__ == "RemoteError"
    assert [(d["command"], d["args"]) for d in seen] == [("install", {"source": "http://h/b.otab"}),
                                                         ("cancel", {"job": "7f3a"})]
    said = capsys.readouterr().err
    assert "ota-agent: canceling job 7f3a at its next safe point (Ctrl-C again to stop waiting)" in said


def test_ctrl_c_of_a_command_that_starts_no_job_interrupts_at_once() -> None:
    ours, theirs = socket.socketpair()
    seen: list[dict[str, Any]] = []

    def daemon(receive: Callable[[], dict[str, Any]], send: Callable[[dict[str, Any]], None]) -> None:
        receive()
        interrupt_the_client()

    thread = peer(theirs, daemon, seen)
    with Session(ours, "test.sock") as session, pytest.raises(KeyboardInterrupt):
        session.call("status", {})
    thread.join(5)
    theirs.close()
    assert [d["command"] for d in seen] == ["status"]


def test_a_second_ctrl_c_before_the_job_is_named_stops_waiting_and_says_how_to_look() -> None:
    ours, theirs = socket.socketpair()
    seen: list[dict[str, Any]] = []

    def daemon(receive: Callable[[], dict[str, Any]], send: Callable[[dict[str, Any]], None]) -> None:
        receive()
        interrupt_the_client()
        interrupt_the_client()

    thread = peer(theirs, daemon, seen)
    with Session(ours, "test.sock") as session, pytest.raises(Exception, match="before the agent named the job") as e:
        session.call("install", {"source": "http://h/b.otab"}, starts_job=True)
    thread.join(5)
    theirs.close()
    assert "`ota-agent status` tells whether it runs" in str(e.value)
