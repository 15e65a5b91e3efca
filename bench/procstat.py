"""Reading a process's memory and CPU from /proc, for the benchmarks.

`rss_kib(pid)` is VmRSS, `hwm_kib(pid)` VmHWM (the kernel's own peak of RSS
over the process's life), `cpu_seconds(pid)` utime + stime from
/proc/PID/stat, `descendants(pid)` every live process below `pid` (a broker
started through a wrapper script: the VM is a child or grandchild).
`Sampler` polls a set of process groups in a thread and keeps, per group, the
peak of the summed RSS.

Owns no process; a process that is gone reads as 0.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _status_field(pid: int, name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    return _status_field(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    return _status_field(pid, "VmHWM")


def threads(pid: int) -> int:
    return _status_field(pid, "Threads")


def cpu_seconds(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: fields 14 and 15 of stat(5)


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


class Sampler:
    """Polls `groups` (name -> a function returning that group's pids) every
    `interval` seconds; `peak[name]` is the largest summed VmRSS seen (KiB),
    `peak_each[name]` the largest single-process VmRSS of the group."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]], interval: float = 0.5) -> None:
        self.groups = groups
        self.interval = interval
        self.peak: dict[str, int] = dict.fromkeys(groups, 0)
        self.peak_each: dict[str, int] = dict.fromkeys(groups, 0)
        self.peak_threads: dict[str, int] = dict.fromkeys(groups, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def sample(self) -> None:
        for name, pids in self.groups.items():
            values = [rss_kib(pid) for pid in pids()]
            self.peak[name] = max(self.peak[name], sum(values))
            self.peak_each[name] = max(self.peak_each[name], max(values, default=0))
            self.peak_threads[name] = max(self.peak_threads[name], sum(threads(pid) for pid in pids()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()
