"""The crash-point matrix: every named crash point (agent.crashpoint) of every
flow, each run once as a real process under the power-cut tracer that SIGKILLs
itself at the point, then checked twice from that one run:

* as a **process kill**: the files exactly as the dead process left them (the
  page cache survives a kill);
* as a **power cut** at the same instant: every tree the dropped-unsynced-writes
  model (`tests.powercut.replay`, variants synced / names / all / torn) allows.

After each: the device powers on and settles on a good slot holding a known
image the flow allows, its status is consistent with the slots, no report the
event log acknowledged before the cut is lost or contradicted, and the next
install works (`tests.powercut.explore.Explorer`); provisioning leaves no
bootable partial slot and completes when run again; a USB receipt on the stick
is never half there (the .json, written last, means both files are complete);
an outbox acknowledgement cut short only re-sends, never loses, a report; a
job the real MQTT intake accepted from a real broker (journalled, no PUBACK
yet) runs exactly once after the device comes back, whatever the cut kept
(the broker redelivers it, the journal absorbs the duplicate) and later jobs
run;
the new slot's /etc is the old or the merged one, never a mix, and merging
again completes it (tests.powercut.etcstates).

`POINTS` lists them; `run_point` runs one and returns what it found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent import sim
from agent.crashpoint import ENV
from agent.daemon import build_device
from agent.events import Event
from agent.mqtt.journal import Journal
from agent.mqtt.schema import JobStatus
from agent.mqtt.topics import Topics
from agent.outbox import EventLog
from bundler import usb
from tests.fixtures.factory import blank_device
from tests.fixtures.mosquitto import Mosquitto, mosquitto_binary
from tests.fixtures.pki import make_pki
from tests.fixtures.procs import LOOPBACK
from tests.fixtures.watcher import Watcher, until
from tests.powercut.conftest import COMPATIBLE, SLOT_SIZE, Releases
from tests.powercut.etcstates import check_state, make_trees, merged_reference, snapshot
from tests.powercut.explore import REPO, Explorer, Image, Scenario
from tests.powercut.replay import VARIANTS, Baseline, State, Trace
from tests.powercut.test_power_cut_states import SCENARIOS, explorer_for

MQTT_DEVICE = "pc-gw"
NO_IMAGE = Image("none", 0, 0, "")


def mqtt_job(job_id: str) -> bytes:
    return json.dumps({"schema": 1, "id": job_id, "type": "reboot", "created": "2026-05-01T12:00:00Z"}).encode()

INSTALL_POINTS = (
    "after-fetch-head", "after-verify", "after-started-reported", "after-mark-bad", "after-trial-saved",
    "mid-payload", "before-sync", "before-read-back", "after-read-back", "after-set-primary",
    "after-installed-recorded",
)
PROVISION_STEPS = ("key", "identity", "config", "image", "bootloader", "record")


@dataclass(frozen=True)
class Point:
    flow: str
    name: str
    phase: str

    @property
    def id(self) -> str:
        return f"{self.flow}:{self.name}"


POINTS: tuple[Point, ...] = (
    *(Point("install", n, {"after-fetch-head": "fetch", "after-verify": "verify",
                           "after-started-reported": "report", "after-mark-bad": "mark target unbootable",
                           "after-trial-saved": "record in flight", "mid-payload": "write", "before-sync": "fsync",
                           "before-read-back": "read-back", "after-read-back": "read-back",
                           "after-set-primary": "switch", "after-installed-recorded": "report"}[n])
      for n in INSTALL_POINTS),
    Point("replace-pending", "after-cancel-pending", "cancel the pending update"),
    Point("replace-pending", "after-mark-bad", "mark target unbootable"),
    Point("commit", "during-health-check", "health check"),
    Point("commit", "after-mark-good", "commit"),
    Point("commit", "after-commit-recorded", "commit report"),
    Point("rollback", "during-health-check", "health check"),
    Point("rollback", "after-trial-failure-saved", "health verdict"),
    Point("rollback", "after-mark-bad-trial", "mark trial bad"),
    Point("rollback", "before-reboot", "reboot"),
    Point("rollback", "after-rollback-recorded", "rollback report"),
    Point("media", "media-report-half-written", "USB report write"),
    Point("media", "mid-payload", "write (from a stick)"),
    Point("outbox", "outbox-after-ack", "outbox ack"),
    Point("mqtt", "mqtt-job-journalled", "accept a job (MQTT intake)"),
    Point("etc-merge", "etc-merge-before-swap", "/etc merge: built and synced, not swapped"),
    Point("etc-merge", "etc-merge-after-swap", "/etc merge: swapped, old tree not removed"),
    *(Point("provision", f"provision-after-{s}", f"provisioning: {s}") for s in PROVISION_STEPS),
)


@dataclass
class PointResult:
    point: Point
    backend: str
    kill: list[str] = field(default_factory=list)  # problems after the process kill
    cut: list[str] = field(default_factory=list)  # problems after the power cuts
    cut_states: int = 0  # distinct dropped-write trees checked

    @property
    def unrecovered(self) -> int:
        return (1 if self.kill else 0) + len({p.split(":", 1)[0] for p in self.cut})


def traced_kill(root: Path, log: Path, point: str, argv: list[str], *, module: str = "tests.powercut.traced_agent"
                ) -> tuple[Baseline, Trace]:
    """Run argv under the tracer with the crash point armed; it must die there."""
    baseline = Baseline.take(root)
    cmd = [sys.executable, "-m", module, "--root", str(root), "--log", str(log), "--", *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), ENV: point}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != -9:
        raise AssertionError(f"crash point {point} was not reached (exit {proc.returncode}): {proc.stderr[-600:]}")
    trace = Trace.load(baseline, log)
    if trace.unsupported():
        raise AssertionError(f"untraceable operations: {trace.unsupported()}")
    return baseline, trace


def cut_states(trace: Trace, kill_tree: str | None) -> list[State]:
    """The distinct trees a power cut at the crash instant can leave, other than the kill's."""
    end = len(trace.ops)
    seen: dict[str, State] = {}
    for variant in VARIANTS:
        state = trace.state(end, variant)
        if state is not None:
            seen.setdefault(trace.tree_hash(state), state)
    seen.pop(kill_tree or "", None)
    return list(seen.values())


def run_point(tmp_path: Path, releases: Releases, point: Point, backend: str) -> PointResult:
    runner: Callable[[Path, Releases, Point, PointResult], None] = {
        "provision": _provision, "outbox": _outbox, "mqtt": _mqtt_intake, "media": _media, "etc-merge": _etc_merge,
    }.get(point.flow, _device_flow)
    result = PointResult(point, backend)
    runner(tmp_path, releases, point, result)
    return result


# -- flows on a simulated device -------------------------------------------------------


def _device_flow(tmp_path: Path, releases: Releases, point: Point, result: PointResult) -> None:
    scenario = SCENARIOS[point.flow]
    explorer = explorer_for(tmp_path, releases, scenario, result.backend, installs=0)
    argv = [a.replace("{dir}", str(explorer.dir)) for a in explorer.scenario.argv]
    if argv[0] != "sim":
        argv = ["-c", str(sim.config_path(explorer.dir)), *argv]
    _check_device(explorer, tmp_path, point, argv, result, extra=None)


def _media(tmp_path: Path, releases: Releases, point: Point, result: PointResult) -> None:
    """The stick lies inside the traced tree, so its receipts' power-cut states are modelled too."""
    scenario = Scenario("media", ("media", "{dir}/stick"), ("A",), frozenset({"factory", "2.0"}), pending=False)
    explorer = explorer_for(tmp_path, releases, scenario, result.backend, installs=0)
    stick = explorer.dir / "stick"
    usb.prepare_dir(stick, [releases.v2.bundle])
    argv = ["-c", str(sim.config_path(explorer.dir)), "media", str(stick)]
    _check_device(explorer, tmp_path, point, argv, result, extra=lambda: _stick_receipts(stick))


def _check_device(explorer: Explorer, tmp_path: Path, point: Point, argv: list[str], result: PointResult,
                  extra: Callable[[], list[str]] | None) -> None:
    explorer.baseline, trace = traced_kill(explorer.dir, tmp_path / "trace", point.name, argv)
    kill_state = trace.state(len(trace.ops), "all")
    assert kill_state is not None
    result.kill = explorer.check(trace, kill_state, next_install=True)
    if extra is not None:
        result.kill += extra()
    states = cut_states(trace, trace.tree_hash(kill_state))
    result.cut_states = len(states)
    for n, state in enumerate(states):
        found = explorer.check(trace, state, next_install=n == len(states) - 1)
        if extra is not None:
            found += extra()
        result.cut += [f"{state.variant}: {p}" for p in found]


def _stick_receipts(stick: Path) -> list[str]:
    problems = []
    reports = stick / "edge-ota" / "reports"
    for receipt in reports.glob("*.json") if reports.is_dir() else []:
        if not receipt.with_suffix(".txt").is_file():
            problems.append(f"receipt {receipt.name} without its .txt")
        try:
            json.loads(receipt.read_text())
        except ValueError as e:
            problems.append(f"receipt {receipt.name} is not whole: {e}")
    try:
        usb.read_receipts(stick)
    except Exception as e:  # a half-written receipt must not break the technician's report
        problems.append(f"ota-bundle usb report fails on the stick: {type(e).__name__}: {e}")
    return problems


# -- provisioning ------------------------------------------------------------------------


def _provision(tmp_path: Path, releases: Releases, point: Point, result: PointResult) -> None:
    from tests.powercut.test_provision_power_cuts import (  # noqa: PLC0415  # pytest collects that module
        _bootable_slots_hold_whole_images,
    )

    d = tmp_path / "device"
    config = blank_device(d, backend=result.backend, keyring=releases.keyring, compatible=COMPATIBLE,
                          slot_size=SLOT_SIZE, broker="mqtt://127.0.0.1:1883")
    argv = ["-c", str(config), "provision", "--bundle", str(releases.v2.bundle), "--device-id", "pc-1"]
    _, trace = traced_kill(d, tmp_path / "trace", point.name, argv)
    image = releases.v2.image
    explorer = Explorer(d, Scenario("provision", tuple(argv), (), frozenset()), result.backend, {},
                        (releases.v4.bundle, releases.v4.image))
    kill_state = trace.state(len(trace.ops), "all")
    assert kill_state is not None

    def check(state: State) -> list[str]:
        explorer.materialize(trace, state)
        problems = _bootable_slots_hold_whole_images(d, config, image.sha256, image.size)
        return problems + _provision_again(d, config, argv, image.sha256, image.size)

    result.kill = check(kill_state)
    states = cut_states(trace, trace.tree_hash(kill_state))
    result.cut_states = len(states)
    for state in states:
        result.cut += [f"{state.variant}: {p}" for p in check(state)]


def _provision_again(d: Path, config: Path, argv: list[str], image_sha: str, size: int) -> list[str]:
    """Provisioning run again (as its own process) completes with the image in both slots."""
    rec = d / "provision" / "record.json"
    pinned = rec.exists() and '"device_id": "pc-1"' in rec.read_text()
    again = [sys.executable, "-m", "agent.cli", *(argv[:-2] if pinned else argv), "--json"]  # see _rerun
    proc = subprocess.run(again, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 and "already provisioned" not in proc.stderr:
        return [f"provisioning again failed: {proc.stderr.strip()[-300:]}"]
    problems = []
    for b in ("A", "B"):
        with (d / f"slot-{b}.img").open("rb") as f:
            if hashlib.sha256(f.read(size)).hexdigest() != image_sha:
                problems.append(f"slot {b} does not hold the image after provisioning again")
    if '"device_id": "pc-1"' not in (d / "provision" / "record.json").read_text():
        problems.append("the record lost the device id")
    build_device(config).bootloader.state()  # the provisioned bootloader state reads back
    return problems


# -- the outbox acknowledgement -------------------------------------------------------------


def _outbox(tmp_path: Path, releases: Releases, point: Point, result: PointResult) -> None:
    root = tmp_path / "root"
    (root / "state").mkdir(parents=True)
    _, trace = traced_kill(root, tmp_path / "trace", point.name, ["outbox", str(root / "state")],
                           module="tests.reliability.outbox_driver")
    kill_state = trace.state(len(trace.ops), "all")
    assert kill_state is not None
    explorer = Explorer(root, Scenario("outbox", (), (), frozenset()), result.backend, {},
                        (releases.v4.bundle, releases.v4.image))

    def check(state: State) -> list[str]:
        explorer.materialize(trace, state)
        log = EventLog(root / "state")
        pending = [r.event.txn or "" for r in log.outbox.pending()]
        problems = []
        if "t3" not in pending:
            problems.append(f"the unacknowledged report t3 was lost: pending {pending}")
        if pending != sorted(pending):
            problems.append(f"reports out of order: {pending}")
        log.emit(Event(event="install", result="ok", txn="t4"))
        after = [r.event.txn for r in log.outbox.pending()]
        if after[-1:] != ["t4"]:
            problems.append(f"the next report was not queued: {after}")
        log.outbox.ack(max(r.seq for r in log.outbox.pending()))
        if log.outbox.pending():
            problems.append("acknowledging everything left reports pending")
        return problems

    result.kill = check(kill_state)
    states = cut_states(trace, trace.tree_hash(kill_state))
    result.cut_states = len(states)
    for state in states:
        result.cut += [f"{state.variant}: {p}" for p in check(state)]



# -- accepting an MQTT job ---------------------------------------------------------------------


def _mqtt_intake(tmp_path: Path, releases: Releases, point: Point, result: PointResult) -> None:
    """A job published on a real mosquitto reaches the device's real MQTT intake, which
    journals it and dies at the crash point. After the kill and after every power-cut tree,
    the device starts again on that broker: the job (redelivered by the broker's session
    and published once more by the operator) runs exactly once and is answered succeeded,
    and a new job runs too."""
    if mosquitto_binary() is None:
        raise AssertionError("mosquitto is not installed (make test installs it)")
    broker = Mosquitto(tmp_path / "mosquitto", make_pki(tmp_path / "pki"))
    broker.start()
    try:
        _intake_against(tmp_path, broker, point, result)
    finally:
        broker.stop()


def _intake_against(tmp_path: Path, broker: Mosquitto, point: Point, result: PointResult) -> None:
    topics = Topics.for_device(MQTT_DEVICE)
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    spec = tmp_path / "device.json"
    spec.write_text(json.dumps({"state_dir": str(root / "dev"),
                                "mqtt": {"broker": f"mqtt://{LOOPBACK}:{broker.port}", "device_id": MQTT_DEVICE}}))
    op = Watcher(LOOPBACK, broker.port, [topics.job_status("j1"), topics.job_status("j2")])
    try:
        baseline = Baseline.take(root)
        argv = ["-m", "tests.reliability.mqtt_intake_driver", "--root", str(root), "--log", str(tmp_path / "trace"),
                "--", str(spec)]
        with _device(tmp_path, argv, point.name) as proc:
            op.publish(topics.job("j1"), mqtt_job("j1"))
            rc = proc.wait(60)
        if rc != -9:
            raise AssertionError(f"crash point {point.name} was not reached (exit {rc})")
        trace = Trace.load(baseline, tmp_path / "trace")
        if trace.unsupported():
            raise AssertionError(f"untraceable operations: {trace.unsupported()}")
        explorer = Explorer(root, Scenario("mqtt", (), (), frozenset()), result.backend, {}, (Path(), NO_IMAGE))

        def check(state: State) -> list[str]:
            explorer.materialize(trace, state)
            return _intake_restart(tmp_path, root / "dev", spec, op, topics)

        kill_state = trace.state(len(trace.ops), "all")
        assert kill_state is not None
        result.kill = check(kill_state)
        # every tree a cut at any traced op up to the crash point leaves (a few: the journal's writes)
        trees = {trace.tree_hash(s): s for s in trace.states()}
        trees.pop(trace.tree_hash(kill_state), None)
        result.cut_states = len(trees)
        for state in trees.values():
            result.cut += [f"{state.variant} before op {state.cut}: {p}" for p in check(state)]
    finally:
        op.close()


@contextlib.contextmanager
def _device(tmp_path: Path, argv: list[str], point: str | None) -> Iterator[subprocess.Popen[bytes]]:
    """The device process, up and subscribed; stopped (SIGTERM, then SIGKILL) when left."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PYTHONPATH"] = str(REPO)
    if point:
        env[ENV] = point
    with (tmp_path / "device.log").open("ab") as err:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line != b"ready\n":
            raise AssertionError(f"the device did not come up: {(tmp_path / 'device.log').read_text()[-1500:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _intake_restart(tmp_path: Path, state_dir: Path, spec: Path, op: Watcher, topics: Topics) -> list[str]:
    since = len(op.messages)  # answers of this restart only

    def answered(job_id: str) -> set[str]:
        topic = topics.job_status(job_id)
        return {str(m.json().get("status")) for m in op.messages[since:] if m.topic == topic and not m.retain}

    try:
        with _device(tmp_path, ["-m", "tests.component._mqtt_device", str(spec)], None):
            op.publish(topics.job("j1"), mqtt_job("j1"))  # the operator tries again, on top of the redelivery
            op.publish(topics.job("j2"), mqtt_job("j2"))
            until(lambda: "succeeded" in answered("j1") and "succeeded" in answered("j2"), "j1 and j2 answered", 30)
    except AssertionError as e:
        return [f"after the restart: {e}"]
    runs = (state_dir / "runs").read_text().split() if (state_dir / "runs").exists() else []
    problems = [] if sorted(runs) == ["j1", "j2"] else [f"jobs run {runs}; each of j1, j2 must run exactly once"]
    record = Journal(state_dir / "mqtt-jobs.journal").get("j1")
    if record is None or record.status is not JobStatus.SUCCEEDED:
        problems.append(f"the journal says j1 is {record.status.value if record else 'unknown'}")
    bad = (answered("j1") | answered("j2")) - {"succeeded"}
    if bad:
        problems.append(f"jobs answered {sorted(bad)}")
    return problems


# -- the /etc merge ---------------------------------------------------------------------------


def _etc_merge(tmp_path: Path, releases: Releases, point: Point, result: PointResult) -> None:
    """Killed and cut at the merge's crash points (the merged tree built and synced beside
    /etc; swapped in with RENAME_EXCHANGE, the old tree not yet removed)."""
    root = tmp_path / "root"
    old, cur, slot = make_trees(root)
    unmerged = snapshot(slot / "etc")
    merged = merged_reference(old, cur, slot, tmp_path)
    _, trace = traced_kill(root, tmp_path / "trace", point.name, [str(old), str(cur), str(slot)],
                           module="tests.reliability.etc_driver")
    kill_state = trace.state(len(trace.ops), "all")
    assert kill_state is not None
    explorer = Explorer(root, Scenario("etc-merge", (), (), frozenset()), result.backend, {},
                        (releases.v4.bundle, releases.v4.image))

    def check(state: State) -> list[str]:
        explorer.materialize(trace, state)
        return check_state(old, cur, slot, unmerged, merged)

    result.kill = check(kill_state)
    states = cut_states(trace, trace.tree_hash(kill_state))
    result.cut_states = len(states)
    for state in states:
        result.cut += [f"{state.variant}: {p}" for p in check(state)]
