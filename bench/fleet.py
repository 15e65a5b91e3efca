"""Fleet benchmark: the agent idle on a broker, and one deploy to N simulated
devices through one mosquitto and through a 2-node RabbitMQ cluster. Prints
tables; no pass/fail (issue 7's targets are in the output beside the numbers).

    .venv/bin/python -m bench.fleet                       # = make bench-fleet
    .venv/bin/python -m bench.fleet --devices 200 --procs 4 --idle-seconds 0 --brokers mosquitto

1. Idle. `ota-agent sim init DIR ... --mqtt URL --device-id idle-0` and one
   real `ota-agent -c DIR/agent.toml run` daemon connected to a private
   mosquitto on a loopback port. Once its retained status arrived and a
   warm-up passed, VmRSS (/proc/PID/status) is sampled every 0.5 s for
   `--idle-seconds` (min/max), and CPU is utime+stime (/proc/PID/stat) over the
   window, as % of one core.
2. Fleet. `--devices` N simulated devices in `--procs` processes
   (bench/fleet_host.py: each device is the agent's real application, MQTT
   front end, job queue, journal and outbox over a real simulated device with
   small slot files; its reboot is the simulator's in-process power cycle with
   boot-check, as the daemon does it). The bundle comes from one
   `ota-fleet serve` origin on loopback. Devices connect (staggered), the
   fleet idles `--fleet-idle-seconds`, then one
   `ota-fleet --broker URL deploy --group bench --url ... --wait --json`
   is sent. A subscriber on every device topic (bench/tally.py) counts the
   messages passing through the broker and timestamps the group job and
   every device's `succeeded`. Measured: time from the broker delivering the
   deploy to the last `succeeded` (and from starting `ota-fleet`), messages
   per device by kind, broker and agent processes' peak RSS and CPU, and
   every device that did not succeed. Against RabbitMQ (3.10: MQTT 3.1.1
   only, retained messages only to exact-topic subscriptions) the devices
   alternate between the two nodes, speak 3.1.1 (the `[mqtt]` default), and
   `deploy` gets `--expect N` (it cannot learn the group's members from the
   retained status).

Scratch space under `--workdir` (default /var/tmp), removed unless `--keep`.
Owns the orchestration and the tables; hosting is bench/fleet_host.py's,
counting bench/tally.py's, the brokers bench/brokers.py's, /proc reading bench/procstat.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.brokers import MosquittoBroker, start_broker
from bench.fleet_report import FleetResult, IdleResult, print_fleet, print_idle
from bench.install_vs_dd import scratch_dir
from bench.procstat import Sampler
from bench.tally import Tally
from tests.fixtures.procs import LOOPBACK, free_ports, spawn, stop_process, wait_for_ports

ROOT = Path(__file__).resolve().parents[1]
COMPATIBLE = "bench-fleet-v1"
GROUP = "bench"
TOPIC_ROOT = "edge-ota/v1"
MIB = 1 << 20
IDLE_WARMUP = 5.0
TERMINAL = ("succeeded", "failed", "rejected", "canceled", "timed-out", "rolled-back")


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def child_env() -> dict[str, str]:
    """Children run this tree's code (also when the console scripts belong to another checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listen_overflows() -> int:
    """TcpExt ListenOverflows (machine-wide): connections a full accept queue turned away."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(row.get("ListenOverflows", 0))
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (/proc/stat), every process on the machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / procstat.TICK


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# ---- set-up: keys, image, bundle, origin --------------------------------------------------------------


@dataclass
class Setup:
    work: Path
    keys: Path
    image: Path  # the factory image in both slots
    slot_size: int
    bundle: Path  # version 2.0: another image
    bundle_url: str = ""
    origin: subprocess.Popen[bytes] | None = None
    commands: list[str] = field(default_factory=list)

    def run(self, argv: list[str]) -> None:
        self.commands.append(shlex.join(argv))
        subprocess.run(argv, check=True, capture_output=True, env=child_env())


def make_image(path: Path, size: int, seed: int) -> None:
    """A quarter random bytes, a quarter text-like, half zeros: compresses like a small root filesystem."""
    rng = random.Random(seed)
    quarter = size // 4
    text = bytes(rng.choice(b"abcdefghij klmnop\n") for _ in range(quarter))
    path.write_bytes(rng.randbytes(quarter) + text + bytes(size - 2 * quarter))


def prepare(args: argparse.Namespace, work: Path) -> Setup:
    keys, www = work / "keys", work / "www"
    www.mkdir(parents=True)
    s = Setup(work, keys, work / "image.img", args.slot_mib * MIB, www / "bundle.otab")
    make_image(s.image, args.image_kib * 1024, args.seed)
    v2 = work / "image-v2.img"
    make_image(v2, args.image_kib * 1024, args.seed + 1)
    s.run([tool("ota-bundle"), "keygen", str(keys)])
    s.run([tool("ota-bundle"), "create", "--image", str(v2), "--key", str(keys / "signing.key"), "--version",
           "2.0", "--security-version", "1", "--compatible", COMPATIBLE, "-o", str(s.bundle)])
    port = free_ports(1)[0]
    serve = [tool("ota-fleet"), "serve", str(www), "--port", str(port), "--bind", LOOPBACK]
    if args.origin_backlog:
        serve = [sys.executable, "-m", "bench.origin", str(www), "--port", str(port), "--bind", LOOPBACK,
                 "--backlog", str(args.origin_backlog)]
    s.commands.append(shlex.join(serve))
    s.origin = spawn(serve, work / "origin.log", env=child_env(), cwd=ROOT)
    wait_for_ports(s.origin, [port], 15, "ota-fleet serve", work / "origin.log")
    s.bundle_url = f"http://{LOOPBACK}:{port}/{s.bundle.name}"
    return s


# ---- 1. the agent idle -------------------------------------------------------------------------------------


def run_idle(args: argparse.Namespace, s: Setup) -> IdleResult:
    broker = MosquittoBroker(s.work / "idle-broker")
    tally = Tally(broker.host, broker.port, TOPIC_ROOT)
    device = s.work / "idle-device"
    s.run([tool("ota-agent"), "sim", "init", str(device), "--image", str(s.image), "--keyring",
           str(s.keys / "signing.pub"), "--compatible", COMPATIBLE, "--slot-size", str(s.slot_size),
           "--mqtt", broker.urls[0], "--device-id", "idle-0"])
    argv = [tool("ota-agent"), "-c", str(device / "agent.toml"), "run"]
    s.commands.append(shlex.join(argv))
    with (device / "daemon.log").open("ab") as log:
        daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  env=child_env())
    try:
        if not wait_until(lambda: tally.count_online() == 1 or daemon.poll() is not None, 60):
            raise RuntimeError(f"the idle daemon did not come online; see {device / 'daemon.log'}")
        if daemon.poll() is not None:
            raise RuntimeError(f"the idle daemon exited with {daemon.returncode}; see {device / 'daemon.log'}")
        time.sleep(IDLE_WARMUP)
        tally.set_phase("idle")
        print(f"idle: measuring the daemon (pid {daemon.pid}) for {args.idle_seconds:.0f} s ...", flush=True)
        rss: list[int] = []
        cpu0, t0 = procstat.cpu_seconds(daemon.pid), time.monotonic()
        end = t0 + args.idle_seconds
        while time.monotonic() < end:
            rss.append(procstat.rss_kib(daemon.pid))
            time.sleep(0.5)
        cpu1, t1 = procstat.cpu_seconds(daemon.pid), time.monotonic()
        kinds, _, _ = tally.snapshot()
        return IdleResult(t1 - t0, min(rss), max(rss), procstat.hwm_kib(daemon.pid),
                          100.0 * (cpu1 - cpu0) / (t1 - t0), procstat.threads(daemon.pid),
                          sum(kinds.get("idle", Counter()).values()), broker.note)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        tally.close()
        broker.stop()


# ---- 2. the fleet ----------------------------------------------------------------------------------------------


class Host:
    """One bench/fleet_host.py process and the JSON lines it writes."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("ab"),
                                     cwd=ROOT, env=child_env(), text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))
        self.lines.put({"event": "exited"})

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.log.name}: no {event!r} within {timeout:.0f} s") from None
        if msg.get("event") != event:
            raise RuntimeError(f"{self.log.name}: expected {event!r}, got {msg}; see {self.log}")
        return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def cpu_of(pids: list[int]) -> float:
    return sum(procstat.cpu_seconds(pid) for pid in pids)


def run_fleet(args: argparse.Namespace, s: Setup, kind: str) -> FleetResult:
    n, procs = args.devices, min(args.procs, args.devices)
    print(f"fleet/{kind}: starting the broker ...", flush=True)
    broker = start_broker(kind, s.work / f"broker-{kind}", args.rabbit_nodes)
    result = FleetResult(kind, broker.note, n, procs)
    hosts: list[Host] = []
    tally: Tally | None = None
    try:
        tally = Tally(broker.host, broker.port, TOPIC_ROOT, sys_topics=kind == "mosquitto")
        root = s.work / f"fleet-{kind}"
        root.mkdir()
        began = time.monotonic()
        per, extra = divmod(n, procs)
        first = 0
        for w in range(procs):
            count = per + (1 if w < extra else 0)
            argv = [sys.executable, "-m", "bench.fleet_host", "--root", str(root), "--first", str(first),
                    "--count", str(count), "--image", str(s.image), "--keyring", str(s.keys / "signing.pub"),
                    "--compatible", COMPATIBLE, "--slot-size", str(s.slot_size), "--group", GROUP,
                    "--stagger", str(args.stagger), "--log", str(root / f"host-{w}.log")]
            for url in broker.urls:
                argv += ["--broker", url]
            hosts.append(Host(argv, root / f"host-{w}.stderr"))
            first += count
        for h in hosts:
            h.expect("created", 600)
        result.create_s = time.monotonic() - began
        print(f"fleet/{kind}: {n} devices created in {result.create_s:.1f} s; connecting ...", flush=True)

        agents = [h.proc.pid for h in hosts]
        assert s.origin is not None
        origin_pid = s.origin.pid
        groups: dict[str, Callable[[], list[int]]] = {"broker": broker.pids, "agents": lambda: agents,
                                                      "origin": lambda: [origin_pid]}
        sampler = Sampler(groups).start()
        began = time.monotonic()
        for h in hosts:
            h.send("start")
        for h in hosts:
            result.threads.append(int(h.expect("started", 60 + n * args.stagger)["threads"]))
        if wait_until(lambda: tally is not None and tally.count_online() >= n, args.connect_timeout):
            result.online_s = time.monotonic() - began
        result.online = tally.count_online()
        print(f"fleet/{kind}: {result.online}/{n} devices online"
              + (f" in {result.online_s:.1f} s" if result.online_s is not None else " (gave up waiting)"), flush=True)
        time.sleep(2.0)  # the last devices' first status round

        tally.set_phase("idle")
        cpu_a, cpu_b, t0 = cpu_of(agents), cpu_of(broker.pids()), time.monotonic()
        time.sleep(args.fleet_idle_seconds)
        result.idle_s = time.monotonic() - t0
        result.idle_cpu_agents = 100.0 * (cpu_of(agents) - cpu_a) / result.idle_s
        result.idle_cpu_broker = 100.0 * (cpu_of(broker.pids()) - cpu_b) / result.idle_s

        tally.set_phase("deploy")
        sys0 = dict(tally.sys)
        cpu_a, cpu_b, cpu_o = cpu_of(agents), cpu_of(broker.pids()), procstat.cpu_seconds(origin_pid)
        overflows, busy, result.load = listen_overflows(), machine_busy_seconds(), os.getloadavg()
        deploy = [tool("ota-fleet"), "--broker", broker.urls[0], "deploy", "--group", GROUP, "--url", s.bundle_url,
                  "--wait", "--json", "--timeout", str(args.timeout)]
        if kind == "rabbitmq":
            deploy += ["--expect", str(n)]
        result.deploy_cmd = shlex.join(deploy)
        print(f"fleet/{kind}: {result.deploy_cmd}", flush=True)
        spawned = time.monotonic()
        with (root / "deploy.json").open("wb") as out, (root / "deploy.stderr").open("wb") as err:
            proc = subprocess.run(deploy, stdout=out, stderr=err, env=child_env(), timeout=args.timeout + 120,
                                  check=False)
        result.deploy_wall = time.monotonic() - spawned
        result.deploy_rc = proc.returncode
        wait_until(lambda: tally is not None and len(tally.finals()) >= n, 10)
        time.sleep(3.0)  # late duplicates
        result.agents_cpu = cpu_of(agents) - cpu_a
        result.broker_cpu = cpu_of(broker.pids()) - cpu_b
        result.origin_cpu = procstat.cpu_seconds(origin_pid) - cpu_o
        result.machine_cpu = machine_busy_seconds() - busy
        result.listen_overflows = listen_overflows() - overflows
        if "received" in tally.sys and "received" in sys0:
            result.sys_received = tally.sys["received"] - sys0["received"]
            result.sys_sent = tally.sys["sent"] - sys0["sent"]
        sampler.stop()
        result.broker_peak = sampler.peak["broker"]
        result.agents_peak_total = sampler.peak["agents"]
        result.origin_peak = sampler.peak["origin"]
        result.agents_hwm = [procstat.hwm_kib(pid) for pid in agents]
        summarize(result, tally, root, n, spawned)
        print(f"fleet/{kind}: deploy done in {result.deploy_wall:.1f} s (exit {result.deploy_rc}); stopping ...",
              flush=True)
        for h in hosts:
            h.send("stop")
        for h in hosts:
            with contextlib.suppress(RuntimeError):
                h.expect("stopped", 120)
            h.proc.wait(30)
        result.log_errors = sum(
            sum(1 for line in (root / f"host-{w}.log").read_text(errors="replace").splitlines()
                if " ERROR" in line or "Traceback" in line)
            for w in range(procs))
    finally:
        for h in hosts:
            h.kill()
        if tally is not None:
            tally.close()
        broker.stop()
    return result


def summarize(result: FleetResult, tally: Tally, root: Path, n: int, spawned: float) -> None:
    kinds, per_device, jobs = tally.snapshot()
    result.kinds = kinds.get("deploy", Counter())
    result.connect_kinds = kinds.get("connect", Counter())
    deploy_counts = per_device.get("deploy", Counter())
    devices = [f"dev-{i:04d}" for i in range(n)]
    result.per_device_max = max((deploy_counts[d] for d in devices), default=0)
    result.per_device_min = min((deploy_counts[d] for d in devices), default=0)
    result.duplicates = sum(j.duplicates for j in jobs.values())
    result.two_phase = sum(1 for j in jobs.values() if "installed" in j.first and "succeeded" in j.first
                           and j.first["installed"] <= j.first["succeeded"] and "commit" in j.success)
    finals = tally.finals()
    result.finals = Counter(finals.get(d, "no final report") for d in devices)
    succeeded = [j.first["succeeded"] for j in jobs.values() if "succeeded" in j.first]
    if succeeded:
        result.from_spawn = max(succeeded) - spawned
    if tally.job_seen is not None:
        done = sorted(j.first["succeeded"] - tally.job_seen for j in jobs.values() if "succeeded" in j.first)
        if done:
            result.first, result.to_last = done[0], done[-1]
            result.p50 = statistics.median(done)
            result.p90 = done[min(len(done) - 1, int(0.9 * len(done)))]
        for status in ("queued", "in-progress", "installed"):
            times = [j.first[status] - tally.job_seen for j in jobs.values() if status in j.first]
            if times:
                result.phases[status] = statistics.median(times)
    for line in (root / "deploy.json").read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            doc = json.loads(line)
            result.reported["timed out" if doc["timed_out"] else str(doc["status"])] += 1
            if doc["status"] != "succeeded":
                result.failures.append(f"{doc['device']}: {doc['status']} - {doc['reason']}"[:200])
    for d in devices:
        if finals.get(d) not in (None, "succeeded") and not any(f.startswith(d + ":") for f in result.failures):
            result.failures.append(f"{d}: {finals[d]} (seen by the tally)")


# ---- tables -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch(parent: Path, keep: bool) -> Iterator[Path]:
    work = scratch_dir(parent, "edge-ota-fleet-")
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--idle-seconds", type=float, default=60.0, help="idle window of the one daemon (0: skip)")
    p.add_argument("--devices", type=int, default=1000, help="simulated devices in the fleet (0: skip the fleet)")
    p.add_argument("--procs", type=int, default=4, help="processes hosting them")
    p.add_argument("--brokers", default="mosquitto,rabbitmq", help="comma-separated: mosquitto, rabbitmq")
    p.add_argument("--rabbit-nodes", type=int, default=2, help="RabbitMQ cluster size")
    p.add_argument("--image-kib", type=int, default=1024, help="image size (the bundle compresses it)")
    p.add_argument("--slot-mib", type=int, default=2, help="slot file size")
    p.add_argument("--stagger", type=float, default=0.02, help="seconds between two device starts in a process")
    p.add_argument("--fleet-idle-seconds", type=float, default=10.0, help="fleet idle window before the deploy")
    p.add_argument("--connect-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=900.0, help="ota-fleet deploy --timeout")
    p.add_argument("--origin-backlog", type=int, default=0,
                   help="serve bundles with BundleServer at this listen backlog (bench/origin.py) instead of "
                   "`ota-fleet serve` (socketserver's default, 5)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    kinds = [k for k in args.brokers.split(",") if k]
    if any(k not in ("mosquitto", "rabbitmq") for k in kinds):
        p.error("--brokers takes mosquitto and/or rabbitmq")
    nofile = raise_nofile()
    started = time.monotonic()
    with scratch(args.workdir, args.keep) as work:
        s = prepare(args, work)
        try:
            idle = run_idle(args, s) if args.idle_seconds > 0 else None
            fleets = [run_fleet(args, s, k) for k in kinds] if args.devices > 0 else []
        finally:
            if s.origin is not None:
                stop_process(s.origin)
        fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(work)], capture_output=True, text=True,
                            check=False).stdout.strip()
        print()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB, Linux "
              f"{platform.release()}, Python {platform.python_version()}; scratch on {fs or '?'}; "
              f"RLIMIT_NOFILE {nofile}; bundle {s.bundle.stat().st_size / 1024:.0f} KiB from a "
              f"{args.image_kib} KiB image, slots {args.slot_mib} MiB; run took {time.monotonic() - started:.0f} s")
        print("paho: one network thread per device (agent/mqtt/link.py Link.start calls loop_start)")
        if idle is not None:
            print_idle(idle)
        if fleets:
            print_fleet(fleets)
        print()
        print("commands run:")
        for line in s.commands + [r.deploy_cmd for r in fleets]:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
