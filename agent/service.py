"""`ota-agent run`: the long-running service behind ota-agent.service.

One process hosts every front end (the local API socket, MQTT, ...) over one
`App` and its one job queue, so one install runs at a time whatever the source
and every front end sees its progress. Owns the service lifecycle systemd
expects of a Type=notify unit: READY=1 once the device's config, bootloader and
state are readable and the front ends started, a STATUS= line that says what the
device runs or which job runs and how far it is, WATCHDOG=1 at half the
WatchdogSec= interval (so a hung agent is killed and restarted), and on
SIGTERM/SIGINT a stop at a safe point: the running job is canceled (an install
stops between two ops, its target stays unbootable) and waited for, then the
front ends stop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Protocol

from agent.actions import App
from agent.jobs import JobState, JobView
from hw.bootloader.chooser import booted_from_cmdline
from hw.errors import BootEnvError
from hw.sdnotify import SdNotify

log = logging.getLogger(__name__)

IDLE_TICK = 30.0
STOP_GRACE = 30.0  # seconds a canceled job gets to reach its safe point


class FrontEnd(Protocol):
    """A transport the daemon hosts: starts its threads on `start`, ends them on `stop`."""

    name: str

    def start(self, app: App) -> None: ...

    def stop(self) -> None: ...


def idle_line(app: App) -> str:
    device = app.device
    try:
        booted_from_cmdline(device.config.cmdline)
    except BootEnvError:  # no slot marker: a factory environment, where the front ends serve provisioning
        return "no slot booted (a factory environment); idle"
    booted = device.bootloader.booted_slot()
    record = device.store.load().slots.get(booted)
    version = record.version if record and record.version else "unknown"
    return f"booted {booted}, version {version}; idle"


def job_line(view: JobView) -> str:
    line = f"job {view.id} ({view.command}) {view.state.value}"
    if view.progress is not None and view.state is JobState.RUNNING:
        p = view.progress
        line += f": {p.phase} {p.percent:.0f}%"
        if p.eta_seconds is not None:
            line += f", {p.eta_seconds:.0f}s left"
    return line


def run(
    app: App,
    front_ends: Sequence[FrontEnd] = (),
    notify: SdNotify | None = None,
    stop: threading.Event | None = None,
) -> int:
    notify = notify or SdNotify()
    stop = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, stopping at a safe point", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    line = idle_line(app)  # fails loudly now rather than after READY

    last_status = [0.0]

    def on_job(view: JobView) -> None:
        now = time.monotonic()
        if view.state is JobState.RUNNING and now - last_status[0] < 1.0:
            return  # STATUS= at most once a second while a job reports progress
        last_status[0] = now
        notify.status(job_line(view) if not view.state.final else idle_line(app))

    unsubscribe = app.queue.subscribe(on_job)
    started: list[FrontEnd] = []
    try:
        for front in front_ends:
            front.start(app)
            started.append(front)
            log.info("front end %s started", front.name)
        notify.ready(line)
        log.info("agent running: %s", line)
        interval = notify.watchdog_interval() or IDLE_TICK
        while not stop.wait(min(interval, IDLE_TICK)):
            notify.watchdog()
        notify.stopping("stopping")
        _stop_running_job(app, notify)
    finally:
        for front in reversed(started):
            try:
                front.stop()
            except Exception:
                log.exception("front end %s did not stop cleanly", front.name)
        _stop_running_job(app, notify)  # one a front end started while the first stop ran
        unsubscribe()
    return 0


def _stop_running_job(app: App, notify: SdNotify) -> None:
    running = app.queue.running()
    if running is None:
        return
    log.info("stopping: canceling job %s (%s) at its next safe point", running.id, running.command)
    notify.extend_timeout(STOP_GRACE)
    try:
        app.queue.cancel(running.id)
    except Exception:  # it finished meanwhile
        return
    app.queue.wait(running.id, timeout=STOP_GRACE)
