"""`make fuzz`: run every harness under atheris for a set time and print the
executions of each.

Each harness runs in its own process on a corpus under build/fuzz/corpus/NAME
(seeded by tests/fuzz/seeds.py, grown by libFuzzer across runs), with
-timeout=10 (an input that takes longer is a hang, and ends that harness's run).
Crashes do not end it: the first input of each distinct one is kept in
build/fuzz/artifacts/NAME/ (finding-*.input, with the traceback beside it) and
fuzzing goes on. Exit status 1 when any harness found a crash or a hang; its
log is build/fuzz/logs/NAME.log.

Usage: python -m tests.fuzz.run [--seconds N] [HARNESS ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.fuzz.seeds import HARNESSES, write

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "build" / "fuzz"
HANG_SECONDS = 10


def run(name: str, seconds: int, seeds: Path) -> tuple[int, int, str]:
    corpus = WORK / "corpus" / name
    artifacts = WORK / "artifacts" / name
    log = WORK / "logs" / f"{name}.log"
    shutil.rmtree(artifacts, ignore_errors=True)  # findings of this run only
    for d in (corpus, artifacts, log.parent):
        d.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        f"tests.fuzz.fuzz_{name}",
        f"-max_total_time={seconds}",
        f"-timeout={HANG_SECONDS}",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(corpus),
        str(seeds),
    ]
    env = {**os.environ, "FUZZ_FINDINGS": str(artifacts)}
    with log.open("w") as out:
        rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    text = log.read_text(errors="replace")
    runs = re.findall(r"stat::number_of_executed_units:\s+(\d+)", text)
    done = re.findall(r"#(\d+)\s+DONE", text)
    executions = int(runs[-1]) if runs else int(done[-1]) if done else 0
    findings = [p.read_text().splitlines()[0] for p in sorted(artifacts.glob("finding-*.txt"))]
    if rc != 0:
        kind = "hang" if "timeout" in text.lower() else "crash"
        findings.append(f"{kind}: {', '.join(p.name for p in artifacts.glob('*-*') if 'finding' not in p.name)}")
    if not findings:
        return 0, executions, "ok"
    return 1, executions, f"{len(findings)} finding(s) ({artifacts.relative_to(ROOT)}): " + "; ".join(findings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run the fuzz harnesses")
    ap.add_argument("--seconds", type=int, default=60, help="per harness (default 60)")
    ap.add_argument("harness", nargs="*", choices=[[], *HARNESSES], help="default: all")
    args = ap.parse_args(argv)
    seeds = write(WORK / "seeds")
    failed = False
    print(f"{'harness':10} {'executions':>12}  result")
    for name in args.harness or HARNESSES:
        rc, executions, result = run(name, args.seconds, seeds[name])
        failed |= rc != 0
        print(f"{name:10} {executions:>12}  {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
