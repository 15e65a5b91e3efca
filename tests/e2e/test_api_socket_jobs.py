"""Jobs over the local API socket, as docs/api.md describes them: a state-changing
command is answered with its job at once and, followed, with rate-limited
progress ending in the final state and the reply; cancel stops a running install
at its next safe point (the target slot stays unbootable); a subscriber sees
every job update and the status change it causes."""

from __future__ import annotations

from tests.e2e._api import Client, held_bundle, running, running_job, status_over_socket
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


def test_a_followed_install_answers_its_job_then_progress_then_its_reply(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    with running(device) as daemon, Client(daemon.socket) as c:
        c.send({"id": "i-1", "command": "install", "args": {"source": str(make_bundle("2.0"))}, "follow": True})
        answers = c.until(lambda a: "reply" in a or "error" in a)
    assert all(a["id"] == "i-1" for a in answers)
    job = answers[0]["job"]
    assert (job["command"], job["origin"], job["state"] in ("queued", "in-progress")) == ("install", "api", True)
    progress = [a["progress"] for a in answers[1:-1]]
    assert all(p["id"] == job["id"] for p in progress)
    phases = [p["progress"]["phase"] for p in progress if p["progress"]]
    assert phases[0] == "writing"
    assert phases[-1] == "verifying read-back"
    assert progress[-1]["state"] == "succeeded"
    assert progress[-1]["result"]["bundle_version"] == "2.0"
    reply = answers[-1]["reply"]
    assert (reply["command"], reply["ok"], reply["job"]["id"]) == ("install", True, job["id"])
    assert reply["result"]["slot"] == "B"
    assert reply["text"] == "installed version 2.0 into slot B; reboot to try it"


def test_a_second_install_over_the_socket_is_busy_and_names_the_running_job(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    with running(device) as daemon, held_bundle(make_bundle("2.0")) as server, Client(daemon.socket) as first:
        accepted = first.call("install", 1, args={"source": server.url})
        job = running_job(daemon.socket)
        assert accepted["job"]["id"] == job["id"]
        with Client(daemon.socket) as second:
            busy = second.call("mark-bad", 2, args={"slot": "other"})
            again = second.call("install", 3, args={"source": server.url}, follow=True)
        server.release()
    for answer in (busy, again):
        assert answer["error"]["code"] == "busy"
        assert (answer["error"]["job"], answer["error"]["command"]) == (job["id"], "install")
        assert f"busy: job {job['id']} (install) is running" in answer["error"]["message"]


def test_cancel_over_the_socket_stops_an_install_at_a_safe_point(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    with running(device) as daemon, held_bundle(make_bundle("2.0")) as server, Client(daemon.socket) as installer:
        installer.send({"id": 1, "command": "install", "args": {"source": server.url}, "follow": True})
        job = running_job(daemon.socket)
        with Client(daemon.socket) as other:
            canceled = other.call("cancel", "c")
        server.release()  # the install reaches its next safe point
        answers = installer.until(lambda a: "reply" in a)
        status = status_over_socket(daemon.socket)
    assert canceled["reply"]["ok"]
    assert canceled["reply"]["result"]["id"] == job["id"]
    assert answers[-2]["progress"]["state"] == "canceled"
    reply = answers[-1]["reply"]
    assert (reply["ok"], reply["error"]["type"]) == (False, "CanceledError")
    assert reply["error"]["message"] == f"job {job['id']} canceled"
    assert status["job"] is None
    assert status["slots"]["B"]["boot_state"] == "bad"  # marked unbootable before the first byte, and left so
    assert (status["primary"], status["trial"]) == ("A", None)
    last = status["last_result"]
    assert (last["event"], last["txn"]) == ("install", job["id"])
    assert "canceled" in last["reason"]


def test_a_subscriber_sees_every_job_update_and_the_status_it_leads_to(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    with running(device) as daemon, Client(daemon.socket) as sub:
        first = sub.call("subscribe", "s")
        assert first["status"]["slots"]["B"]["version"] == "factory"
        run = device.install(make_bundle("2.0"))  # the CLI, through the daemon
        assert run.rc == 0, run.err
        answers = sub.until(lambda a: "status" in a and a["status"]["slots"]["B"]["version"] == "2.0")
    assert all(a["id"] == "s" for a in answers)
    jobs = [a["progress"] for a in answers if "progress" in a]
    assert {j["origin"] for j in jobs} == {"cli"}
    states = [j["state"] for j in jobs]
    assert states[0] in ("queued", "in-progress")
    assert "succeeded" in states
    assert any(j["progress"] and j["progress"]["phase"] == "writing" for j in jobs)
    assert answers[-1]["status"]["primary"] == "B"
