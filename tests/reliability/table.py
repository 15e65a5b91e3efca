"""`make reliability` (python -m tests.reliability.table): runs the reliability
suites and prints one table: crash points passed (each as a process kill and
as a power cut), dropped-write states survived, hostile bundles rejected,
environment faults survived, random kills and dropped-write states of the soak
(with --soak), fuzz executions per target; and the count of unrecovered cases,
which must be 0 (exit status 1 otherwise, or when a suite fails).

A soak run (--soak) picks one seed for the whole session (printed; --seed
replays it) and writes its random-kill and random-dropped-write rows, with the
seed and when it ran, to build/reliability/last-soak.json (--soak-results;
--soak-only kills|states runs and replaces one part); a run without --soak
shows that file's rows as "(last soak)" rows, not counted in this run's
unrecovered total but printed beside it.

Each suite runs under pytest with EDGE_OTA_RELIABILITY_LOG naming a JSON-lines
file the tests append their cases to (tests.reliability.results); pytest's
own JUnit XML adds the cases of tests that predate that log (MQTT journal kill
points, the e2e power-cut and hostile-input tests), counted as passed or failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tests.reliability.results import ENV

ROOT = Path(__file__).resolve().parents[2]
SOAK_RESULTS = ROOT / "build" / "reliability" / "last-soak.json"
SOAK_CATEGORIES = ("random kills", "random dropped-write states")
NOT_COUNTS = frozenset({"category", "name", "passed", "unrecovered", "phase", "seed"})
SUITES = [
    "tests/reliability",
    "tests/powercut",
]
# Older tests of the same invariants, counted by outcome (category, pytest node path).
COUNTED = [
    ("crash point (older kill tests)", "tests/component/test_mqtt_broker.py", "kill"),
    ("crash point (older kill tests)", "tests/e2e/test_power_cuts.py", ""),
    ("crash point (older kill tests)", "tests/e2e/test_provision_interrupted.py", ""),
    ("crash point (older kill tests)", "tests/etc/test_etc_merge.py", "power_cut"),
    ("hostile input (tests)", "tests/unit/test_format_tamper.py", ""),
    ("hostile input (tests)", "tests/unit/test_format_bounds.py", ""),
    ("hostile input (tests)", "tests/unit/test_delta.py", ""),
    ("hostile input (tests)", "tests/e2e/test_http_hostile_responses.py", ""),
    ("hostile input (tests)", "tests/e2e/test_api_hostile_clients.py", ""),
    ("hostile input (tests)", "tests/e2e/test_console_garbage.py", ""),
    ("hostile input (tests)", "tests/e2e/test_media_toctou.py", ""),
    ("hostile input (tests)", "tests/e2e/test_hostile_manifest_values.py", ""),
    ("environment fault (tests)", "tests/e2e/test_commands_busy.py", ""),
    ("environment fault (tests)", "tests/e2e/test_source_stalls.py", ""),
    ("environment fault (tests)", "tests/e2e/test_watchdog_hang.py", ""),
    ("environment fault (tests)", "tests/e2e/test_damaged_state.py", ""),
    ("environment fault (tests)", "tests/component/test_uboot_env.py", ""),
]


@dataclass
class Row:
    cases: int = 0
    passed: int = 0
    unrecovered: int = 0
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def run_pytest(paths: list[str], log: Path, junit: Path, extra_env: dict[str, str], keyword: str = "") -> int:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *paths]
    if keyword:
        argv += ["-k", keyword]
    env = {**os.environ, ENV: str(log), "PYTHONPATH": str(ROOT), **extra_env}
    print(f"$ pytest {' '.join(paths)}", flush=True)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print("  " + (tail[0] if tail else f"exit {proc.returncode}"), flush=True)
    if proc.returncode not in (0, 5):
        print("\n".join(proc.stdout.splitlines()[-30:]), file=sys.stderr)
    return proc.returncode


def junit_cases(junit: Path) -> list[tuple[str, bool]]:
    if not junit.exists():
        return []
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        failed = case.find("failure") is not None or case.find("error") is not None
        cases.append((f"{case.get('classname')}::{case.get('name')}", not failed))
    return cases


def fuzz(seconds: int) -> list[tuple[str, int, str]]:
    print(f"$ fuzz {seconds} s per target", flush=True)
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--seconds", str(seconds)], cwd=ROOT,
                          capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = []
    for line in proc.stdout.splitlines()[1:]:
        m = re.match(r"(\S+)\s+(\d+)\s+(.*)", line)
        if m:
            rows.append((m.group(1), int(m.group(2)), m.group(3)))
    if proc.returncode != 0 and not rows:
        rows.append(("(fuzz run)", 0, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"))
    return rows


def add_case(rows: dict[str, Row], case: dict[str, object]) -> None:
    row = rows[str(case["category"])]
    row.cases += 1
    row.passed += bool(case["passed"])
    row.unrecovered += int(str(case["unrecovered"]))
    for k, v in case.items():
        if k not in NOT_COUNTS and isinstance(v, int) and not isinstance(v, bool):
            row.counts[k] += v


def save_soak(path: Path, cases: list[dict[str, object]], seed: int, failed: bool) -> None:
    """The soak's own rows, for later tables (written even when a case failed: the tallies
    say so). Per category: a run of only one part (--soak-only) replaces that part's
    tallies and keeps the other's, each with its own seed and time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        categories = dict(json.loads(path.read_text(encoding="utf-8"))["categories"])
    except (OSError, ValueError, KeyError, TypeError):
        categories = {}
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name in SOAK_CATEGORIES:
        mine = [c for c in cases if c["category"] == name]
        if mine:
            categories[name] = {"seed": seed, "finished": finished, "suite_failed": failed, "cases": mine}
    path.write_text(json.dumps({"categories": categories}, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def load_soak(path: Path) -> dict[str, tuple[str, Row]]:
    """Category -> ("seed S, finished T", its tallies); empty when there is no (valid) file."""
    try:
        categories = json.loads(path.read_text(encoding="utf-8"))["categories"]
        out = {}
        for name, part in categories.items():
            rows: dict[str, Row] = defaultdict(Row)
            for case in part["cases"]:
                add_case(rows, case)
            out[str(name)] = (f"seed {int(part['seed'])}, finished {part['finished']}", rows[name])
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--fuzz-seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "10")))
    ap.add_argument("--soak", action="store_true", help="add the random kills and dropped-write states")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="only the new suites (no older counted tests)")
    ap.add_argument("--soak-only", choices=("kills", "states"), default=None,
                    help="with --soak: only that part of the soak (no other suite, no fuzzing)")
    ap.add_argument("--soak-results", type=Path, default=SOAK_RESULTS,
                    help="where a soak writes its tallies and a later table reads them")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rows: dict[str, Row] = defaultdict(Row)
    failed = False
    with tempfile.TemporaryDirectory(prefix="edge-ota-reliability-") as tmp:
        log = Path(tmp) / "cases.jsonl"
        log.touch()
        extra = {}
        paths = list(SUITES)
        if args.soak:
            extra["EDGE_OTA_SOAK"] = "1"
            extra["EDGE_OTA_SOAK_SEED"] = str(seed)
            print(f"soak seed: {seed} (make soak SOAK_SEED={seed} replays it)", flush=True)
        keyword = ""
        if args.soak and args.soak_only:
            paths = ["tests/reliability/test_soak.py"]
            keyword = {"kills": "random_kill", "states": "random_dropped"}[args.soak_only]
        failed |= run_pytest(paths, log, Path(tmp) / "own.xml", extra, keyword) not in (0, 5)
        only_soak = bool(args.soak and args.soak_only)
        for n, (category, path, keyword) in enumerate([] if args.quick or only_soak else COUNTED):
            junit = Path(tmp) / f"counted-{n}.xml"
            failed |= run_pytest([path], log, junit, {}, keyword) not in (0, 5)
            for _, ok in junit_cases(junit):
                row = rows[category]
                row.cases += 1
                row.passed += ok
                row.unrecovered += not ok
        cases = [json.loads(line) for line in log.read_text().splitlines()]
        for case in cases:
            add_case(rows, case)
        if args.soak:
            save_soak(args.soak_results, cases, seed, failed)
        fuzz_rows = fuzz(args.fuzz_seconds) if args.fuzz_seconds > 0 and not only_soak else []
    print()
    print(f"{'category':<32}{'cases':>7}{'passed':>8}{'unrecovered':>13}  counts")
    total_unrecovered = 0
    order = ["crash point", "crash point (older kill tests)", "dropped-write states", "random kills",
             "random dropped-write states", "hostile bundle", "hostile input (tests)", "environment fault",
             "environment fault (tests)"]
    for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
        r = rows[name]
        total_unrecovered += r.unrecovered
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()))
        print(f"{name:<32}{r.cases:>7}{r.passed:>8}{r.unrecovered:>13}  {counts}")
    last = {} if args.soak else load_soak(args.soak_results)
    for name in SOAK_CATEGORIES:
        if name in last:
            when, got = last[name]
            counts = ", ".join(f"{k} {v}" for k, v in sorted(got.counts.items()))
            print(f"{name + ' (last soak)':<32}{got.cases:>7}{got.passed:>8}{got.unrecovered:>13}  {counts}; {when}")
    if last:
        where = args.soak_results
        print(f"  (the last soak's tallies, from {where.relative_to(ROOT) if where.is_relative_to(ROOT) else where};"
              " not counted in this run's unrecovered)")
    for target, executions, result in fuzz_rows:
        bad = result != "ok"
        total_unrecovered += bad
        print(f"{'fuzz ' + target:<32}{executions:>7}{'':>8}{int(bad):>13}  executions; {result}")
    print(f"\nunrecovered: {total_unrecovered}" + ("" if not failed else "  (a suite failed: see above)"))
    return 1 if total_unrecovered or failed else 0


if __name__ == "__main__":
    sys.exit(main())
