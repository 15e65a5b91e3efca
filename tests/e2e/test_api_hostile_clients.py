"""Clients of the local API are untrusted: every malformed line gets exactly one
error object and the daemon goes on serving (the same connection too); a client
that never reads is dropped without holding up a job; more clients than
`max_clients` are refused with one error; an idle client is closed."""

from __future__ import annotations

import json
import socket

import pytest

from tests.e2e._api import Client, connect, running, set_api, status_over_socket, wait_for
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory

BAD_LINES = [
    (b"not json", "bad-json"),
    (b"\xff\xfe{}", "bad-json"),
    (b'{"id": 1, "command": "status", "id": 2}', "bad-json"),
    (b'{"id": 1, "command": "status", "args": {"x": NaN}}', "bad-json"),
    (b"[" * 100_000, "line-too-long"),
    (b"[" * 20_000 + b"]" * 20_000, "bad-json"),
    (b'{"command": "status", "args": {"a": [[[[[[[[[1]]]]]]]]]}}', "bad-request"),
    (b'{"command": "status", "args": {"a": "' + b"9" * 5000 + b'"}}', "bad-args"),
    (b'{"command": "job", "args": {"job": 1' + b"0" * 5000 + b"}}", "bad-json"),
    (b'["status"]', "bad-request"),
    (b'{"command": "status", "extra": 1}', "bad-request"),
    (b'{"id": {"a": 1}, "command": "status"}', "bad-request"),
    (b'{"command": "status", "follow": "yes"}', "bad-request"),
    (b'{"command": "status", "origin": "MQTT!"}', "bad-request"),
    (b'{"command": "format-disk"}', "unknown-command"),
    (b'{"command": 7}', "bad-request"),
    (b'{"command": "install"}', "bad-args"),
    (b'{"command": "install", "args": {"source": 1}}', "bad-args"),
    (b'{"command": "install", "args": {"source": "-"}}', "bad-args"),
    (b'{"command": "install", "args": {"source": "bundle.otab"}}', "bad-args"),
    (b'{"command": "install", "args": {"source": "/b.otab", "force": true}}', "bad-args"),
    (b'{"command": "mark-good", "args": {"slot": "A\\u0000"}}', "bad-request"),
    (b'{"command": "mark-good", "args": {"slot": "\\ud800"}}', "bad-request"),
    (b'{"command": "subscribe", "args": {"x": 1}}', "bad-args"),
]


def test_every_malformed_line_gets_one_error_and_the_connection_keeps_serving(device: SimDevice) -> None:
    with running(device) as daemon, Client(daemon.socket) as c:
        for line, _ in BAD_LINES:
            c.send_raw(line + b"\n")
        c.send({"id": "after", "command": "status"})
        answers = [c.answer() for _ in range(len(BAD_LINES) + 1)]
        assert daemon.proc.poll() is None
    codes = [a.get("error", {}).get("code") for a in answers[:-1]]
    assert codes == [code for _, code in BAD_LINES]
    assert all(a["error"]["message"] and "\n" not in a["error"]["message"] for a in answers[:-1])
    assert answers[-1]["id"] == "after"
    assert answers[-1]["reply"]["ok"]
    assert answers[2]["id"] is None  # a line that is not valid JSON has no id to echo


def test_a_line_without_newline_is_answered_when_the_client_closes_its_side(device: SimDevice) -> None:
    with running(device) as daemon, Client(daemon.socket) as c:
        c.send_raw(b'{"id": 9, "command": "status"}')
        c.sock.shutdown(socket.SHUT_WR)
        answer = c.answer()
        assert c.recv() is None  # everything answered: the daemon closes
    assert answer["id"] == 9
    assert answer["reply"]["ok"]


def test_a_client_that_never_reads_is_dropped_and_does_not_hold_up_an_install(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    with running(device) as daemon:
        stuck = connect(daemon.socket)
        stuck.sendall(b'{"command": "subscribe"}\n' + b'{"command": "status"}\n' * 2000)
        run = device.install(make_bundle("2.0"))  # through the daemon, while `stuck` reads nothing
        assert run.rc == 0, run.err
        wait_for("the daemon to drop the client", lambda: "it does not read its answers" in daemon.log())
        stuck.settimeout(30)
        received = b""
        while chunk := stuck.recv(1 << 20):
            received += chunk
        stuck.close()
        assert received.count(b'"reply"') < 2000  # dropped, not served to the end
        assert status_over_socket(daemon.socket)["slots"]["B"]["version"] == "2.0"


def test_more_clients_than_max_clients_are_refused_with_one_error(device: SimDevice) -> None:
    set_api(device, socket="agent.sock", max_clients=3)
    with running(device) as daemon:
        clients: list[Client] = []
        try:
            for _ in range(3):  # one after another: each is served before the next connects
                clients.append(Client(daemon.socket))
                assert clients[-1].call("status")["reply"]["ok"]
            with Client(daemon.socket) as extra:
                refused = extra.answer()
                assert extra.recv() is None
            assert refused["error"]["code"] == "too-many-clients"
            clients.pop().sock.close()

            def served() -> bool:
                with Client(daemon.socket) as c:
                    return "reply" in c.call("status")

            wait_for("a free place", served)
        finally:
            for c in clients:
                c.sock.close()


def test_an_idle_client_is_closed_but_a_subscriber_is_not(device: SimDevice) -> None:
    set_api(device, socket="agent.sock", idle_timeout=0.5)
    with running(device) as daemon, Client(daemon.socket) as idle, Client(daemon.socket) as sub:
        assert "status" in sub.call("subscribe")
        closing = idle.answer()
        assert idle.recv() is None
        assert closing["error"]["code"] == "idle-timeout"
        sub.send({"id": 2, "command": "status"})
        assert sub.until(lambda a: a["id"] == 2)[-1]["reply"]["ok"]


@pytest.mark.parametrize("line", [b'{"command": "status"}' * 4000, json.dumps({"command": "x" * 70000}).encode()])
def test_a_too_long_line_is_skipped_to_its_end_and_the_next_is_served(device: SimDevice, line: bytes) -> None:
    with running(device) as daemon, Client(daemon.socket) as c:
        c.send_raw(line + b'\n{"id": 2, "command": "status"}\n')
        assert c.answer()["error"]["code"] == "line-too-long"
        assert c.answer()["id"] == 2
