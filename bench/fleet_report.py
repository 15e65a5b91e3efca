"""What `bench/fleet.py` measures (the result records) and how it prints them:
the tables of docs and bench/README.md come from here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


@dataclass
class IdleResult:
    seconds: float
    rss_min: int
    rss_max: int
    hwm: int
    cpu_percent: float
    threads: int
    messages: int
    broker: str


@dataclass
class FleetResult:
    broker: str
    note: str
    devices: int
    procs: int
    create_s: float = 0.0
    online_s: float | None = None
    online: int = 0
    threads: list[int] = field(default_factory=list)
    idle_s: float = 0.0
    idle_cpu_agents: float = 0.0
    idle_cpu_broker: float = 0.0
    to_last: float | None = None  # from the broker delivering the group job to the last succeeded
    from_spawn: float | None = None  # from starting ota-fleet to the last succeeded
    deploy_wall: float = 0.0  # ota-fleet deploy's own run time (it exits once all are final)
    deploy_rc: int | None = None
    p50: float | None = None
    p90: float | None = None
    first: float | None = None
    finals: Counter[str] = field(default_factory=Counter)
    reported: Counter[str] = field(default_factory=Counter)  # what ota-fleet printed per device (its final)
    kinds: Counter[str] = field(default_factory=Counter)
    connect_kinds: Counter[str] = field(default_factory=Counter)
    per_device_max: int = 0
    per_device_min: int = 0
    duplicates: int = 0
    two_phase: int = 0  # succeeded after installed, with a commit as the reason
    sys_received: int | None = None
    sys_sent: int | None = None
    broker_peak: int = 0
    broker_cpu: float = 0.0
    agents_peak_total: int = 0
    agents_hwm: list[int] = field(default_factory=list)
    agents_cpu: float = 0.0
    origin_cpu: float = 0.0
    machine_cpu: float = 0.0  # every process on the machine, during the deploy
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # load average when the deploy started
    phases: dict[str, float] = field(default_factory=dict)  # status -> median time after the deploy
    origin_peak: int = 0
    listen_overflows: int = 0
    log_errors: int = 0
    failures: list[str] = field(default_factory=list)
    deploy_cmd: str = ""


def table(title: str, rows: list[tuple[str, ...]]) -> None:
    print()
    print(title)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                   strict=True))))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def print_idle(r: IdleResult) -> None:
    table(f"1. ota-agent run, idle on {r.broker} ({r.seconds:.0f} s window)", [
        ("measure", "value", "target"),
        ("RSS min (MiB)", mib(r.rss_min), "< 40"),
        ("RSS max (MiB)", mib(r.rss_max), "< 40"),
        ("VmHWM since start (MiB)", mib(r.hwm), ""),
        ("CPU (% of one core)", f"{r.cpu_percent:.2f}", "< 1"),
        ("threads", str(r.threads), ""),
        ("messages published in the window", str(r.messages), ""),
    ])


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def from_devices(r: FleetResult) -> int:
    return sum(v for k, v in r.kinds.items() if k not in ("group-job", "job"))


def per_kind(kind: str) -> Callable[[FleetResult], str]:
    return lambda r: f"{r.kinds.get(kind, 0) / r.devices:.2f}"


def print_fleet(results: list[FleetResult]) -> None:
    head = ("measure", *[f"{r.broker}" for r in results])

    def row(name: str, fn: Callable[[FleetResult], str]) -> tuple[str, ...]:
        return (name, *[fn(r) for r in results])

    kinds = sorted({k for r in results for k in r.kinds})
    rows = [
        head,
        row("devices / host processes", lambda r: f"{r.devices} / {r.procs}"),
        row("devices created (s)", lambda r: f"{r.create_s:.1f}"),
        row("all online after start (s)", lambda r: _s(r.online_s) if r.online == r.devices
            else f"{r.online}/{r.devices} only"),
        row("threads per host process", lambda r: "/".join(map(str, r.threads))),
        row("idle CPU, all agents (% core)", lambda r: f"{r.idle_cpu_agents:.1f}"),
        row("  per device (% core)", lambda r: f"{r.idle_cpu_agents / r.devices:.3f}"),
        row("idle CPU, broker (% core)", lambda r: f"{r.idle_cpu_broker:.1f}"),
        row("deploy -> median queued (s)", lambda r: _s(r.phases.get("queued"))),
        row("deploy -> median in-progress (s)", lambda r: _s(r.phases.get("in-progress"))),
        row("deploy -> median installed (s)", lambda r: _s(r.phases.get("installed"))),
        row("deploy -> first succeeded (s)", lambda r: _s(r.first)),
        row("deploy -> median succeeded (s)", lambda r: _s(r.p50)),
        row("deploy -> 90% succeeded (s)", lambda r: _s(r.p90)),
        row("deploy -> last succeeded (s)", lambda r: _s(r.to_last)),
        row("ota-fleet start -> last succeeded (s)", lambda r: _s(r.from_spawn)),
        row("ota-fleet deploy run time (s)", lambda r: f"{r.deploy_wall:.1f}"),
        row("ota-fleet deploy exit status", lambda r: str(r.deploy_rc)),
        row("final states (tally)", lambda r: ", ".join(f"{v} {k}" for k, v in sorted(r.finals.items()))),
        row("  installed, then succeeded on commit", lambda r: str(r.two_phase)),
        row("final states (ota-fleet)", lambda r: ", ".join(f"{v} {k}" for k, v in sorted(r.reported.items()))),
        row("msgs from devices / device", lambda r: f"{from_devices(r) / r.devices:.1f}"),
        *[row(f"  {k} / device", per_kind(k)) for k in kinds if k not in ("group-job", "job")],
        row("  min..max per device", lambda r: f"{r.per_device_min}..{r.per_device_max}"),
        row("  duplicate job reports (total)", lambda r: str(r.duplicates)),
        row("msgs on connect / device", lambda r: f"{sum(r.connect_kinds.values()) / r.devices:.1f}"),
        row("broker $SYS PUBLISH in / out", lambda r: "-" if r.sys_received is None
            else f"{r.sys_received} / {r.sys_sent}"),
        row("broker peak RSS (MiB)", lambda r: mib(r.broker_peak)),
        row("broker CPU in deploy (s)", lambda r: f"{r.broker_cpu:.1f}"),
        row("agent procs peak RSS, each (MiB)", lambda r: "/".join(mib(v) for v in r.agents_hwm)),
        row("agent procs peak RSS, total (MiB)", lambda r: mib(r.agents_peak_total)),
        row("agent RSS per device (MiB)", lambda r: f"{r.agents_peak_total / 1024 / r.devices:.2f}"),
        row("agent CPU in deploy (s)", lambda r: f"{r.agents_cpu:.1f}"),
        row("machine CPU in deploy (core-s)", lambda r: f"{r.machine_cpu:.1f}"),
        row("load average at deploy", lambda r: " ".join(f"{v:.1f}" for v in r.load)),
        row("origin CPU / peak RSS (s / MiB)", lambda r: f"{r.origin_cpu:.1f} / {mib(r.origin_peak)}"),
        row("TCP listen overflows (machine)", lambda r: str(r.listen_overflows)),
        row("ERROR lines in agent logs", lambda r: str(r.log_errors)),
    ]
    table("2. one group deploy to a simulated fleet", rows)
    for r in results:
        print(f"  {r.broker}: {r.note}")
        for line in r.failures[:10]:
            print(f"    not succeeded: {line}")
        if len(r.failures) > 10:
            print(f"    ... and {len(r.failures) - 10} more")


# ---- main ----------------------------------------------------------------------------------------------------------
