"""Every console command, in text and in JSON, over a pty pair with a scripted
technician: the device's console (pyserial on the subordinate side) serves a
simulated device; the technician types lines on the controlling side and reads
what a terminal would show. A status reply in JSON carries exactly the fields of
`ota-agent status --json`; state-changing commands ask for confirmation first and
run as jobs whose result follows; every command of the table is reachable."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.commands import COMMANDS, Command, Param
from tests.e2e._console import Pty, Relay, Technician, add_console, served
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory


@pytest.fixture
def console(device: SimDevice) -> Iterator[Technician]:
    pty = Pty.open()
    add_console(device.config, pty.path, idle_timeout=60.0, device_id="console-test")
    try:
        with served(device.config):
            tech = Technician(pty.master)
            tech.wait_ready()
            yield tech
    finally:
        pty.close()


def test_status_in_json_has_the_fields_of_ota_agent_status_json(device: SimDevice, console: Technician,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    console.line("json on")
    assert console.reply("json")["result"] == {"json": True}
    console.line("status")
    doc = console.reply("status")
    assert doc["ok"] is True
    cli = device.status()
    assert set(doc["result"]) == set(cli)
    assert doc["result"]["slots"] == cli["slots"]
    assert doc["result"]["booted"] == "A"


def test_text_replies_are_for_people(console: Technician) -> None:
    console.line("status")
    assert console.expect(r"^booted\s+A")
    console.line("slots")
    assert console.expect(r"^slot A\*")
    console.line("help")
    seen = [console.expect(r"^commands of the device"), *console.quiet()]
    for name in COMMANDS:
        assert any(line.strip().startswith(name) for line in seen), name
    console.line("progress")
    assert console.expect("no job is running")
    console.line("log 5")
    assert console.read_line()  # the agent's last log lines (the console's own start at least)
    console.line("frobnicate")
    assert console.expect(r"^error: unknown command 'frobnicate' \(known: status, install")


def test_every_command_of_the_table_is_reachable_in_json(console: Technician) -> None:
    console.line("json on")
    console.reply("json")
    for name, command in COMMANDS.items():
        console.line(name)
        doc = console.reply()
        assert doc["command"] == name, doc
        if command.changes_state:
            assert "confirm" in doc, doc  # asked first, nothing run yet
            console.line("no")
            assert console.reply(name)["ok"] is False
        else:
            assert "ok" in doc
            assert "text" in doc


def test_console_only_commands_in_json(console: Technician) -> None:
    console.line("json on")
    console.reply("json")
    for line, key in (("help", "commands"), ("slots", "slots"), ("log 3", "lines"), ("progress", "job")):
        console.line(line)
        doc = console.reply(line.split()[0])
        assert doc["ok"] is True, doc
        assert key in doc["result"], doc
    console.line("json off")
    assert console.expect("^json off$")


def test_a_bundle_on_the_device_is_installed_after_confirmation(device: SimDevice, console: Technician,
                                                               make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0", security_version=2)
    console.line("json on")
    console.reply("json")
    doc = console.run(f"install {bundle}")
    assert doc["ok"] is True, doc
    assert doc["done"] is True
    assert doc["result"]["bundle_version"] == "2.0"
    assert doc["result"]["slot"] == "B"
    assert device.status()["slots"]["B"]["version"] == "2.0"


def test_not_confirming_runs_nothing(device: SimDevice, console: Technician) -> None:
    before = device.snapshot()
    console.line("mark-bad B")
    assert console.expect("answer yes to go ahead")
    console.line("status")  # anything but yes
    assert console.expect(r"^error: not confirmed; 'mark-bad B' not run")
    assert device.snapshot() == before


def test_mark_rollback_and_reboot_run_in_text(device: SimDevice, console: Technician,
                                              make_bundle: BundleFactory) -> None:
    console.line("mark-good")
    console.expect("answer yes")
    console.line("yes")
    console.expect(r"started; its result follows")
    assert console.expect(r"^slot A: marked good")
    console.line("rollback --no-reboot")
    console.expect("answer yes")
    console.line("yes")
    assert console.expect(r"^rollback to slot B \(version factory\); it is tried on the next boot")
    console.line("reboot")
    console.expect("answer yes")
    console.line("yes")
    assert console.expect("^rebooting$")


def test_collect_logs_writes_to_a_mounted_stick(device: SimDevice, console: Technician, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    stick.mkdir()
    console.line(f"collect-logs {stick}")
    assert console.expect("is not a mount point")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(stick)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        console.line("json on")
        console.reply("json")
        console.line(f"collect-logs {stick}")
        doc = console.reply("collect-logs")
        assert doc["ok"] is True, doc
        written = json.loads(Path(doc["result"]["path"]).read_text())
        assert written["device"] == "console-test"
        assert set(written["status"]) == set(device.status())
    finally:
        subprocess.run(["umount", str(stick)], check=True)


def test_a_command_added_to_the_table_later_is_reachable_and_confirmed(
        console: Technician, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def run(app: object, args: dict[str, object], ctx: object) -> dict[str, object]:
        calls.append(dict(args))
        return {"done": True}

    future = Command("provision-like", "a command the console was not written for",
                     (Param("identity", str, required=True), Param("force", bool, default=False),
                      Param("count", int, default=1)),
                     True, False, run, dict, lambda r: "provisioned")
    monkeypatch.setitem(COMMANDS, future.name, future)
    console.line("json on")
    console.reply("json")
    doc = console.run("provision-like dev-7 --force count=3")
    assert doc["ok"] is True, doc
    assert doc["text"] == "provisioned"
    assert calls == [{"identity": "dev-7", "force": True, "count": 3}]
    console.line("provision-like dev-7 count=three")
    refused = console.reply()
    assert "is not a int" in refused["error"]["message"], refused


def test_ota_agent_console_serves_one_port_standalone_and_stops_on_sigterm(device: SimDevice) -> None:
    pty = Pty.open()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "-c", str(device.config), "console", "--port",
                             pty.path, "--baud", "115200"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        tech = Technician(pty.master)
        tech.wait_ready()
        tech.line("status")
        assert tech.expect(r"^booted\s+A")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        pty.close()


@pytest.mark.parametrize(("table", "message"), [
    ('baud = 12345', "[console] baud: = 12345 is not a standard rate"),
    ('ports = "/dev/ttyS0"', "[console] ports: must be a list of at most 8 paths"),
    ('colour = "red"', "unknown key 'colour'"),
    ('idle_timeout = 0', "[console] idle_timeout: must be a number in 1..86400"),
])
def test_console_config_errors_name_the_key(device: SimDevice, table: str, message: str) -> None:
    with device.config.open("a") as f:
        f.write(f"\n[console]\n{table}\n")
    run = device.agent("status")
    assert run.rc == 1
    assert message in run.one_error_line()


def test_interactive_ota_console_with_line_history(device: SimDevice, tmp_path: Path) -> None:
    relay = Relay()
    add_console(device.config, relay.device.path)
    master, slave = os.openpty()  # the technician's own terminal (cooked, echoing), where ota-console runs
    history = tmp_path / "history"
    env = {**os.environ, "OTA_CONSOLE_HISTORY": str(history), "TERM": "dumb"}
    try:
        with served(device.config):
            proc = subprocess.Popen([sys.executable, "-m", "bundler.console.cli", relay.host.path],
                                    stdin=slave, stdout=slave, stderr=slave, env=env)
            try:
                screen = Screen(master)
                screen.wait_for("connected; 'help' lists the commands")
                screen.wait_for("ota> ")
                os.write(master, b"status\r")
                screen.wait_for(r"booted\s+A")
                os.write(master, b"reboot\r")
                screen.wait_for(r"Go ahead\? \[y/N\]")
                os.write(master, b"n\r")
                screen.wait_for("not confirmed")
                screen.wait_for("ota> ")
                os.write(master, b"\x04")  # Ctrl-D
                assert proc.wait(30) == 1  # the last command was answered with an error
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        os.close(master)
        os.close(slave)
        relay.close()
    assert history.read_text().splitlines()[-2:] == ["status", "reboot"]


class Screen:
    """What a terminal shows: everything written to it, searched as a whole."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""
        self.pos = 0

    def wait_for(self, pattern: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen: {self.text[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                self.text += os.read(self.fd, 65536).decode("utf-8", "replace")
