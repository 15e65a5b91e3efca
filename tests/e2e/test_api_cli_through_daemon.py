"""The CLI through a running daemon: with `ota-agent run` serving the local API
on a simulated device, `ota-agent` commands are sent to it (one job queue: an
install from the CLI is a job of the daemon, a second one is answered busy
with the first job's id) and print exactly what they print standalone; with no
daemon (none started, or one killed that left its socket behind) they run
standalone as before."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.e2e._api import Daemon, cli, held_bundle, running, running_job, status_over_socket, wait_for
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, DeviceFactory

INSTALLED = "installed version 2.0 into slot B; reboot to try it\n"


def progress_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("ota-agent:")]


def test_status_through_the_daemon_is_the_same_as_standalone(device: SimDevice) -> None:
    standalone_json = device.agent("status", "--json")
    standalone_text = device.agent("status")
    with running(device) as daemon:
        over_socket = status_over_socket(daemon.socket)
        through_json = device.agent("status", "--json")
        through_text = device.agent("status")
    assert over_socket == json.loads(standalone_json.out)
    assert (through_json.rc, through_json.out) == (0, standalone_json.out)
    assert (through_text.rc, through_text.out) == (0, standalone_text.out)


def test_cli_install_while_the_daemon_runs_is_the_daemons_job_and_a_second_is_busy_with_its_id(
    device: SimDevice, make_bundle: BundleFactory, make_device: DeviceFactory
) -> None:
    bundle = make_bundle("2.0")
    reference = make_device(name="standalone")
    standalone = reference.install(bundle)
    assert standalone.rc == 0, standalone.err
    with running(device) as daemon, held_bundle(bundle) as server:
        first = cli(device, "install", server.url)
        try:
            job = running_job(daemon.socket)  # the daemon runs it: the CLI does not install itself
            assert (job["command"], job["origin"], job["state"]) == ("install", "cli", "in-progress")
            assert job["progress"]["done"] > 0
            second = device.install(bundle)
            line = second.one_error_line()
            assert f"busy: job {job['id']} (install) is running" in line
            as_json = device.agent("install", str(bundle), "--json")
            assert as_json.rc == 1
            assert json.loads(as_json.err)["error"]["type"] == "BusyError"
        finally:
            server.release()
            out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        status = status_over_socket(daemon.socket)
    assert out.decode() == standalone.out == INSTALLED
    assert progress_lines(err.decode()) == progress_lines(standalone.err)
    assert {"writing: 25%", "writing: 100%", "verifying read-back: 100%"} <= set(progress_lines(standalone.err))
    assert status["job"] is None
    assert status["last_result"]["txn"] == job["id"]
    assert (status["slots"]["B"]["version"], status["primary"]) == ("2.0", "B")
    assert "local API: install requested by uid" in daemon.log()


def test_cli_install_of_a_relative_path_goes_through_the_daemon(
    device: SimDevice, make_bundle: BundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle("2.0")
    monkeypatch.chdir(bundle.parent)
    with running(device) as daemon:
        run = device.install(bundle.name, "--json")
        log = daemon.log()
    assert run.rc == 0, run.err
    assert json.loads(run.out)["bundle_version"] == "2.0"
    assert "local API: install requested by uid" in log


def test_install_from_stdin_runs_standalone_beside_the_daemon(device: SimDevice, make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0")
    with running(device) as daemon, bundle.open("rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "-c", str(device.config), "install", "-"],
                              stdin=stdin, capture_output=True, timeout=120, check=False)
        status = status_over_socket(daemon.socket)
        log = daemon.log()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == INSTALLED
    assert "requested by" not in log
    assert status["slots"]["B"]["version"] == "2.0"


def test_sigterm_during_a_cli_install_through_the_daemon_cancels_it_and_the_daemon_exits_0(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    with held_bundle(make_bundle("2.0")) as server:
        daemon = Daemon(device).wait_ready()
        install = cli(device, "install", server.url)
        try:
            job = running_job(daemon.socket)
            daemon.proc.send_signal(signal.SIGTERM)
            wait_for("the daemon to cancel the job", lambda: f"canceling job {job['id']}" in daemon.log())
            server.release()  # the job reaches its next safe point
            assert daemon.terminate() == 0, daemon.log()
        finally:
            server.release()
            daemon.stop()
            out, err = install.communicate(timeout=60)
    assert install.returncode == 1
    assert out == b""
    assert f"ota-agent: error: job {job['id']} canceled" in err.decode().splitlines()
    status = device.status()  # no daemon now: standalone
    assert status["slots"]["B"]["boot_state"] == "bad"  # the target stays unbootable
    assert (status["primary"], status["trial"]) == ("A", None)
    assert status["last_result"]["txn"] == job["id"]
    assert "canceled" in status["last_result"]["reason"]


def test_cli_runs_standalone_when_the_daemon_died_and_left_its_socket(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    daemon = Daemon(device).wait_ready()
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.stop()
    assert daemon.socket.is_socket()  # stale: nobody listens
    probe = socket.socket(socket.AF_UNIX)
    with pytest.raises(ConnectionRefusedError):
        probe.connect(str(daemon.socket))
    probe.close()
    status = device.agent("status", "--json")
    assert status.rc == 0, status.err
    install = device.install(make_bundle("2.0"))
    assert (install.rc, install.out) == (0, INSTALLED)
    # A new daemon replaces the stale socket and serves.
    with running(device) as again:
        assert status_over_socket(again.socket)["slots"]["B"]["version"] == "2.0"
        assert "replacing the stale API socket" in again.log()


def test_a_second_daemon_on_the_same_socket_is_refused(device: SimDevice) -> None:
    with running(device) as first:
        second = subprocess.run([sys.executable, "-m", "agent.cli", "-c", str(device.config), "run"],
                                capture_output=True, timeout=60, check=False)
        assert second.returncode == 1
        assert "another ota-agent daemon serves" in second.stderr.decode()
        assert status_over_socket(first.socket)["booted"] == "A"  # the first still serves


def test_boot_check_runs_standalone_beside_the_daemon(device: SimDevice) -> None:
    with running(device) as daemon:
        run = device.agent("boot-check", "--json")
        log = daemon.log()
    assert run.rc == 0, run.err
    assert "requested by" not in log


def test_cli_uses_a_daemon_whose_socket_path_is_longer_than_sun_path(
    make_device: DeviceFactory, make_bundle: BundleFactory
) -> None:
    device = make_device(name="d" * 70 + "/" + "e" * 40)
    socket_path = device.dir / "agent.sock"
    assert len(os.fsencode(socket_path)) > 108
    with running(device, socket_path) as daemon:
        assert socket_path.is_socket()
        run = device.install(make_bundle("2.0"))
        assert (run.rc, run.out) == (0, INSTALLED)
        assert "local API: install requested by uid" in daemon.log()


def test_ctrl_c_of_a_cli_install_through_the_daemon_cancels_the_job_at_a_safe_point(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    with running(device) as daemon, held_bundle(make_bundle("2.0")) as server:
        install = cli(device, "install", server.url)
        try:
            job = running_job(daemon.socket)
            install.send_signal(signal.SIGINT)
            wait_for("the CLI's cancel request", lambda: "local API: cancel requested by uid" in daemon.log())
            server.release()
        finally:
            server.release()
            out, err = install.communicate(timeout=60)
        status = status_over_socket(daemon.socket)
    lines = err.decode().splitlines()
    assert install.returncode == 1
    assert out == b""
    assert f"ota-agent: canceling job {job['id']} at its next safe point (Ctrl-C again to stop waiting)" in lines
    assert lines[-1] == f"ota-agent: error: job {job['id']} canceled"
    assert status["slots"]["B"]["boot_state"] == "bad"
    assert (status["job"], status["primary"]) == (None, "A")
