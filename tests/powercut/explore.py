"""The power-cut explorer: run one real agent operation on a simulated device
under the tracer, then for every distinct tree a power cut could leave
(`tests.powercut.replay`), put that tree in place, power the device on and
check what must hold whatever the cut:

* it settles on a committed slot whose content is exactly a known image the
  scenario allows to run, and the slots the operation must not write are
  byte-for-byte what they were;
* `status` works; no slot record claims a hash (or a version or security
  version) its slot does not hold; the booted slot's record names what runs;
  the security floor is not above what runs; no trial is left pending;
* no report the event log acknowledged before the cut is lost, no report
  contradicts another (a cancelled or failed update later committed), a
  rollback is reported only where one happened and names its real cause, and
  every acknowledged outcome holds ("installed" is tried and committed,
  "committed" runs, "cancelled" or "failed" never runs);
* on a sample of the states, the next install of a fresh bundle succeeds and
  commits.

Results (ops traced, states explored, distinct states, failures) are collected
in `RESULTS` for the session summary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent import sim
from agent.bootcheck import HealthOverride
from agent.daemon import build_device
from agent.installer import install
from agent.sources import source_for
from agent.status import status
from hw.bootloader.model import SlotBootState
from tests.powercut.replay import Baseline, State, Trace

REPO = Path(__file__).resolve().parents[2]
BIG = 1 << 16  # files at least this big are rewritten only when their content changes
EVENT_KEY = ("event", "result", "txn", "bundle_version", "slot", "time")


@dataclass(frozen=True)
class Image:
    version: str
    security_version: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Scenario:
    """One traced operation. `argv` is the agent's command line after `-c CONFIG`
    (``{dir}`` is replaced by the device directory); `health` is what the slot under
    test does at every later power-on; `untouched` lists slots whose files the
    operation must not change; `runs` the versions allowed to run afterwards;
    `rollback` what every rollback report must say (None: none may be reported).
    Before tracing, the device (`tries` boot attempts) gets the pending update
    when `pending`, then `pre_boots` power-ons that die before boot-check."""

    name: str
    argv: tuple[str, ...]
    untouched: tuple[str, ...]
    runs: frozenset[str]
    health: HealthOverride | None = None
    rollback: str | None = None
    pending: bool = True
    tries: int = 3
    pre_boots: int = 0


@dataclass
class Result:
    scenario: str
    backend: str
    ops: int = 0
    explored: int = 0
    distinct: int = 0
    installs: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


RESULTS: list[Result] = []


def event_key(event: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(event.get(k) for k in EVENT_KEY)


class Explorer:
    def __init__(
        self,
        device_dir: Path,
        scenario: Scenario,
        backend: str,
        images: dict[str, Image],
        fresh_bundle: tuple[Path, Image],
        *,
        installs: int = 3,
        tracer_args: tuple[str, ...] = (),
    ) -> None:
        self.dir = device_dir
        self.scenario = scenario
        self.images = images  # by version
        self.by_sha = {i.sha256: i for i in images.values()}
        self.fresh_bundle, self.fresh = fresh_bundle
        self.by_sha[self.fresh.sha256] = self.fresh
        self.installs = installs
        self.tracer_args = tracer_args
        self.result = Result(scenario.name, backend)
        self._on_disk: dict[str, tuple[str, tuple[int, int, int]]] = {}

    # -- the traced run ------------------------------------------------------------

    def trace(self, log_dir: Path) -> Trace:
        self.baseline = Baseline.take(self.dir)
        argv = [a.replace("{dir}", str(self.dir)) for a in self.scenario.argv]
        if argv[0] != "sim":
            argv = ["-c", str(sim.config_path(self.dir)), *argv]
        cmd = [sys.executable, "-m", "tests.powercut.traced_agent", "--root", str(self.dir), "--log", str(log_dir),
               *self.tracer_args, "--", *argv]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"traced run failed ({proc.returncode}): {proc.stderr}")
        trace = Trace.load(self.baseline, log_dir)
        if trace.unsupported():
            raise AssertionError(f"untraceable operations: {trace.unsupported()}")
        missed = untraced_changes(trace, self.dir)
        if missed:
            raise AssertionError(f"writes the tracer did not see: {missed}")
        self.result.ops = trace.fs_ops
        return trace

    # -- exploring -------------------------------------------------------------------

    def explore(self, trace: Trace) -> Result:
        distinct: dict[str, State] = {}
        seen: dict[tuple[Any, ...], str] = {}
        for state in trace.states():
            self.result.explored += 1
            tree = seen.get(state.entries)
            if tree is None:
                tree = seen[state.entries] = trace.tree_hash(state)
            if tree not in distinct or distinct[tree].cut < state.cut:
                distinct[tree] = state  # the latest cut: it has the most acknowledged reports
        self.result.distinct = len(distinct)
        states = sorted(distinct.values(), key=lambda s: (s.cut, s.variant))
        every = max(1, -(-len(states) // self.installs)) if self.installs else 0
        for n, state in enumerate(states):
            sample = bool(every) and (n % every == every - 1 or n == len(states) - 1)
            for problem in self.check(trace, state, next_install=sample):
                self.result.failures.append(f"cut before op {state.cut} ({state.variant}): {problem}")
        return self.result

    def materialize(self, trace: Trace, state: State) -> None:
        materialize(self.dir, trace, state, self._on_disk)

    # -- checking one state ------------------------------------------------------------

    def check(self, trace: Trace, state: State, *, next_install: bool) -> list[str]:
        self.materialize(trace, state)
        sc = self.scenario
        problems = self.power_on_and_check(trace.acknowledged(state.cut), sc.health, sc.runs, sc.untouched)
        if next_install and not problems:
            problems += self.check_next_install()
        return problems

    def power_on_and_check(
        self,
        acked: list[dict[str, Any]],
        health: HealthOverride | None,
        runs: frozenset[str],
        untouched: tuple[str, ...],
    ) -> list[str]:
        try:
            boots = sim.power_on(self.dir, health=health, say=lambda _: None)
        except Exception as e:  # any failure to boot is the finding
            return [f"power-on failed: {type(e).__name__}: {e}"]
        problems: list[str] = []
        device = build_device(sim.config_path(self.dir))
        booted = boots[-1].slot
        try:
            doc = status(device).to_json()
            events = [asdict(r.event) for r in device.events.outbox.pending()]
        except Exception as e:
            return [f"status failed after boot on {booted}: {type(e).__name__}: {e}"]
        content = {b: self.slot_content(b) for b in sim.BOOTNAMES}
        running = content[booted]
        if doc["slots"][booted]["boot_state"] != SlotBootState.GOOD.value:
            problems.append(f"settled on slot {booted}, which is {doc['slots'][booted]['boot_state']}")
        if running is None or running.version not in runs:
            problems.append(f"slot {booted} runs {_name(running)}; allowed: {sorted(runs)}")
        for b in untouched:
            before = hashlib.sha256(self.baseline.files[f"slot-{b}.img"][0]).hexdigest()
            if _sha256(self.dir / f"slot-{b}.img") != before:
                problems.append(f"slot {b} was written")
        for b, rec in doc["slots"].items():
            if rec["sha256"] is None:
                continue
            image = self.by_sha.get(rec["sha256"])
            if image is None:
                problems.append(f"slot {b} record names an unknown hash {rec['sha256'][:12]}")
            elif content[b] != image:
                problems.append(f"slot {b} record says {image.version}, the slot holds {_name(content[b])}")
            elif (rec["version"], rec["security_version"]) != (image.version, image.security_version):
                problems.append(f"slot {b} record: version {rec['version']} sv {rec['security_version']} "
                                f"for the content of {image.version}")
        if running is not None:
            if doc["slots"][booted]["sha256"] != running.sha256:
                problems.append(f"booted slot {booted} runs {running.version}, its record says "
                                f"{doc['slots'][booted]['version']}")
            if doc["committed_security_version"] > running.security_version:
                problems.append(f"security floor {doc['committed_security_version']} is above the running "
                                f"{running.version} ({running.security_version})")
        if doc["trial"] is not None:
            problems.append(f"a trial is still pending after settling: {doc['trial']}")
        last = doc["last_result"]
        if last is not None and event_key(last) not in {event_key(e) for e in events}:
            problems.append(f"the last result is missing from the outbox: {last['event']} {last['result']}")
        problems += self.check_reports(acked, events, running)
        return problems

    def check_reports(
        self, acked: list[dict[str, Any]], events: list[dict[str, Any]], running: Image | None
    ) -> list[str]:
        problems = []
        have = {event_key(e) for e in events}
        for e in acked:
            if event_key(e) not in have:
                problems.append(f"acknowledged report lost: {e['event']} {e['result']} {e['reason'][:60]}")
        results: dict[str | None, set[tuple[str, str]]] = {}
        for e in events:
            results.setdefault(e["txn"], set()).add((e["event"], e["result"]))
            if e["event"] == "rollback":
                if self.scenario.rollback is None:
                    problems.append(f"reports a rollback that did not happen: {e['reason'][:90]}")
                elif self.scenario.rollback not in e["reason"]:
                    problems.append(f"rollback reason lost: {e['reason'][:90]}")
        for txn, got in results.items():
            if ("commit", "ok") in got and got & {("install", "cancelled"), ("install", "failed")}:
                problems.append(f"txn {txn} reported both committed and {sorted(got)}")
            if ("commit", "ok") in got and any(ev == "rollback" for ev, _ in got):
                problems.append(f"txn {txn} reported both committed and rolled back")
        version = running.version if running else None
        for e in acked:
            outcome = (e["event"], e["result"])
            if outcome in (("install", "ok"), ("commit", "ok")) and e["bundle_version"] != version:
                problems.append(f"acknowledged {outcome[0]} {outcome[1]} of {e['bundle_version']}, runs {version}")
            if outcome in (("install", "cancelled"), ("commit", "failed")) and e["bundle_version"] == version:
                problems.append(f"acknowledged {outcome[0]} {outcome[1]} of {version}, which runs")
        return problems

    def check_next_install(self) -> list[str]:
        self.result.installs += 1
        device = build_device(sim.config_path(self.dir))
        try:
            with source_for(str(self.fresh_bundle)).open() as stream:
                install(device, stream)
        except Exception as e:
            return [f"next install failed: {type(e).__name__}: {e}"]
        finally:
            self._on_disk.clear()  # it wrote a slot
        problems = self.power_on_and_check([], None, frozenset({self.fresh.version}), ())
        if not problems:
            floor = status(build_device(sim.config_path(self.dir))).committed_security_version
            if floor != self.fresh.security_version:
                problems.append(f"the floor is {floor}, not {self.fresh.security_version}")
        return [f"after the next install: {p}" for p in problems]

    def slot_content(self, bootname: str) -> Image | None:
        path = self.dir / f"slot-{bootname}.img"
        data = path.read_bytes()
        for image in self.by_sha.values():
            if len(data) >= image.size and hashlib.sha256(data[: image.size]).hexdigest() == image.sha256:
                return image
        return None


def materialize(root: Path, trace: Trace, state: State,
                on_disk: dict[str, tuple[str, tuple[int, int, int]]] | None = None) -> None:
    """Put the tree of `state` in place under `root`, rewriting only what differs (`on_disk`
    remembers big files already written: content hash and inode signature)."""
    known_files = on_disk if on_disk is not None else {}
    want = dict(state.entries)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            e = want.get(rel)
            if os.path.islink(full):
                if e is None or e.kind != "l" or os.readlink(full) != e.target:
                    os.unlink(full)
            elif name in filenames:
                if e is None or e.kind != "f":
                    os.unlink(full)
                    known_files.pop(rel, None)
            elif e is None or e.kind != "d":
                shutil.rmtree(full)
    for rel, e in want.items():
        path = root / rel
        if e.kind == "d":
            path.mkdir(exist_ok=True)
            os.chmod(path, e.mode)
        elif e.kind == "l" and not path.is_symlink():
            os.symlink(e.target, path)
    for rel, e in want.items():
        if e.kind != "f":
            continue
        path = root / rel
        digest = trace.content_hash(e)
        known = known_files.get(rel)
        if known is not None and known[0] == digest and known[1] == _signature(path):
            continue
        data = trace.content(e)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, e.mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.chmod(path, e.mode)
        if len(data) >= BIG:
            known_files[rel] = (digest, _signature(path))


def untraced_changes(trace: Trace, root: Path) -> list[str]:
    """Paths whose real content after the traced run differs from the log replayed in
    full: a write path the tracer does not see."""
    state = trace.state(len(trace.ops), "all")
    assert state is not None
    final = dict(state.entries)
    actual = Baseline.take(root)
    problems = []
    for rel in sorted(set(final) | set(actual.files) | set(actual.dirs) | set(actual.links)):
        e = final.get(rel)
        if e is None:
            problems.append(f"{rel} exists but was not traced")
        elif e.kind == "d":
            if rel not in actual.dirs:
                problems.append(f"{rel}: traced as a directory")
        elif e.kind == "l":
            if actual.links.get(rel) != e.target:
                problems.append(f"{rel}: traced as a symlink to {e.target}")
        elif rel not in actual.files:
            problems.append(f"{rel}: traced but absent")
        elif trace.content(e) != actual.files[rel][0]:
            problems.append(f"{rel}: content differs from the traced writes")
    return problems


def _signature(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _name(image: Image | None) -> str:
    return image.version if image else "no known image"


def summary_lines() -> list[str]:
    if not RESULTS:
        return []
    lines = [f"{'scenario':<16}{'backend':<8}{'ops':>6}{'explored':>10}{'distinct':>10}{'installs':>10}"
             f"{'failing':>9}{'seconds':>9}"]
    for r in RESULTS:
        lines.append(f"{r.scenario:<16}{r.backend:<8}{r.ops:>6}{r.explored:>10}{r.distinct:>10}{r.installs:>10}"
                     f"{len(r.failures):>9}{r.seconds:>9.1f}")
    explored, distinct = sum(r.explored for r in RESULTS), sum(r.distinct for r in RESULTS)
    failing, seconds = sum(len(r.failures) for r in RESULTS), sum(r.seconds for r in RESULTS)
    lines.append(f"total: {explored} states explored, {distinct} distinct, {failing} failing, {seconds:.0f} s")
    return lines


