"""The MQTT front end of `ota-agent run`: jobs from the broker become commands of
the command table, and the device's reports go back (docs/mqtt.md).

It is the `FrontEnd` the daemon hosts and the `JobSink` the job intake hands
journalled jobs to. `submit()` runs on paho's network thread and only decides
(accept, or "busy" naming the running job); a worker thread ("mqtt-jobs") does
the rest, in order, so no journal write or outbox append blocks the network:

    install    -> `install` (source = the job's URL): in-progress, then
                  "installed" once written and read back, then the reboot
                  (`reboot_after_install`, default true: the `reboot` command,
                  which on a simulated device is the in-process power cycle),
                  then "succeeded" only when boot-check committed the new slot
                  (a commit event whose txn is the job id), or "rolled-back"
                  with boot-check's reason (health checks, watchdog, bootloader
                  fallback). A bundle the device refuses before writing
                  (signature, policy, compatibility) ends "rejected" with the
                  installer's text; any later failure "failed".
    reboot, mark-good (the booted slot), rollback (with reboot)
               -> the command of the same name; a rollback succeeds when the
                  slot it went back to committed.
    install-stream -> `install` from the job's chunk stream (agent.mqtt.stream: the
                  bundle arrives on `.../jobs/<id>/chunks` with flow control on
                  `.../credit`), then the same phases and outcomes as install.
    cancel     -> `cancel` of the target job; status -> the retained status is
                  published again and the job answered at once.

Each step is journalled (`Journal.set_status`) before the front end acts on it
and then appended to the durable outbox as a `job` event, which the reporter
publishes on `.../jobs/<id>/status` (agent.mqtt.reports). After a real reboot
the agent starts again: jobs that had started are settled from the state file
and the outbox (agent.mqtt.settle), and an installed job whose verdict is not
in yet (boot-check still running) is looked at again every few seconds.

Also published here, not through the outbox: progress of the running job
(QoS 0, at most once a second per phase, plus each phase's first and last),
and the retained status (the application's status document), published on
connect, after every job state change and whenever a poll sees it changed.

Owns the mapping from jobs to commands and their lifecycle; not the protocol
(agent/mqtt/*), not what the commands do (agent.actions).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.actions import App, RollbackOutcome
from agent.commands import execute
from agent.errors import BusyError
from agent.events import EtcConflict, Event
from agent.installer import InstallOutcome, InstallResult
from agent.jobs import JobContext, JobState, JobView
from agent.mqtt import reports, settle
from agent.mqtt.channel import MqttChannel
from agent.mqtt.config import MqttConfig
from agent.mqtt.errors import JournalError, TransitionError
from agent.mqtt.intake import JobAnswer
from agent.mqtt.journal import JobRecord
from agent.mqtt.reporter import Message
from agent.mqtt.schema import Job, JobStatus, JobType, encode
from agent.mqtt.stream import MqttStreamSource
from agent.outbox import Record
from hw.bootloader import model
from ota_common.errors import OtaError
from ota_common.text import clean

log = logging.getLogger(__name__)

ORIGIN = "mqtt"
# Errors that mean "the device refuses this" (nothing was changed), as opposed to a failure on the way.
REFUSALS = frozenset({
    "PolicyError", "IncompatibleError", "DowngradeError", "ExpiredError", "PlanError", "SignatureError",
    "FormatError", "BoundsError", "MarkError",
})
COMMANDS: dict[JobType, tuple[str, dict[str, Any]]] = {
    JobType.REBOOT: ("reboot", {}),
    JobType.MARK_GOOD: ("mark-good", {"slot": "booted"}),
    JobType.ROLLBACK: ("rollback", {"reboot": True}),
}


@dataclass(slots=True)
class _Active:
    """The MQTT job that owns the job queue now (worker thread only)."""

    job: Job
    phase: str  # the command running for it: install, reboot (after the install), reboot, mark-good, rollback
    outcome: InstallOutcome | None = None


class MqttFrontEnd:
    name = "mqtt"

    def __init__(self, config: MqttConfig, *, reboot_in_process: bool = False, status_interval: float = 5.0,
                 settle_interval: float = 2.0, progress_interval: float = 1.0) -> None:
        """`reboot_in_process`: the rebooter returns after the reboot (the simulator's power cycle);
        otherwise a reboot ends this process and the job is settled when the agent starts again."""
        self.config = config
        self.reboot_in_process = reboot_in_process
        self.status_interval = status_interval
        self.settle_interval = settle_interval
        self.progress_interval = progress_interval
        self._app: App | None = None
        self._channel: MqttChannel[Record] | None = None
        self._lock = threading.Lock()
        self._claimed: str | None = None  # the MQTT job accepted and not finished with the queue
        self._tasks: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Any = None
        self._progress_sent: dict[str, tuple[float, str]] = {}
        # worker thread only:
        self._active: _Active | None = None
        self._waiting: dict[str, JobRecord] = {}
        self._status_sent: bytes | None = None
        self._status_error = ""
        self._router: Callable[[Record], Message] | None = None
        self._status_checked = 0.0
        self._settle_checked = 0.0

    # ---- FrontEnd --------------------------------------------------------------------------------

    def start(self, app: App) -> None:
        self._app = app
        device = app.device
        self._channel = channel = MqttChannel(self.config, state_dir=device.config.state_dir, sink=self,
                                              outbox=device.events.outbox, route=self._route, clock=device.clock)
        channel.link.add_listener(_LinkEvents(self._tasks))
        self._unsubscribe = app.queue.subscribe(self._on_job)
        for record in channel.journal.unfinished():  # settled before any job queued meanwhile runs
            if record.status is not JobStatus.QUEUED:
                self._tasks.put(("resume", record))
        self._thread = threading.Thread(target=self._run, name="mqtt-jobs", daemon=True)
        self._thread.start()
        channel.start()  # hands jobs journalled "queued" to submit() again, then connects

    def stop(self) -> None:
        self._tasks.put(("stop", None))
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._channel is not None:
            self._channel.stop()

    # ---- JobSink (paho's network thread: decide, never wait) ----------------------------------------

    def submit(self, job: Job) -> JobAnswer:
        if job.type in (JobType.STATUS, JobType.CANCEL):
            self._tasks.put(("start", job))
            return JobAnswer.queued()
        with self._lock:
            running = self._claimed
            if running is None:
                view = self._need_app().queue.running()
                running = view.id if view is not None else None
            if running is not None:
                return JobAnswer.busy(running)
            self._claimed = job.id
        self._tasks.put(("start", job))
        return JobAnswer.queued()

    # ---- the job queue's listener (the job's thread) ----------------------------------------------

    def _on_job(self, view: JobView) -> None:
        if view.state is JobState.RUNNING and view.progress is not None:
            self._progress(view)
            return
        if view.state.final:
            with self._lock:
                self._progress_sent.pop(view.id, None)
        self._tasks.put(("job", view))

    def _progress(self, view: JobView) -> None:
        p = view.progress
        assert p is not None
        now = time.monotonic()
        with self._lock:
            last = self._progress_sent.get(view.id)
            due = last is None or last[1] != p.phase or now - last[0] >= self.progress_interval or p.done >= p.total
            if not due:
                return
            self._progress_sent[view.id] = (now, p.phase)
        channel, app = self._need_channel(), self._need_app()
        doc = reports.progress_report(channel.topics.device, view, app.device.clock())
        if doc is not None and channel.link.connected:
            channel.link.publish(channel.topics.progress, encode(doc), qos=0)
        channel.reporter.wake()  # the installer's events written meanwhile

    # ---- the worker thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = self.settle_interval if self._waiting else self.status_interval
            try:
                kind, item = self._tasks.get(timeout=timeout)
            except queue.Empty:
                kind, item = "tick", None
            if kind == "stop":
                return
            try:
                self._handle(kind, item)
                self._periodic()
            except Exception:  # a bug must not stop the front end: log it and go on with the next task
                log.exception("mqtt front end: %s failed", kind)

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "start":
            self._start(item)
        elif kind == "job":
            self._job_changed(item)
        elif kind == "resume":
            self._resume(item)
        elif kind == "connected":
            self._publish_status(force=True)

    def _periodic(self) -> None:
        now = time.monotonic()
        if self._waiting and now - self._settle_checked >= self.settle_interval:
            self._settle_checked = now
            for record in list(self._waiting.values()):
                self._settle(record.id)
        if now - self._status_checked >= self.status_interval:
            self._publish_status()

    # ---- starting jobs -------------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        if job.type is JobType.STATUS:
            self._status_job(job)
        elif job.type is JobType.CANCEL:
            self._cancel_job(job)
        elif job.type is JobType.INSTALL:
            self._run_command(job, "install", {"source": job.url, "allow_downgrade": job.allow_downgrade})
        elif job.type is JobType.INSTALL_STREAM:
            self._run_stream(job)
        else:
            name, args = COMMANDS[job.type]
            self._run_command(job, name, args)

    def _run_command(self, job: Job, name: str, args: dict[str, Any]) -> None:
        if not self._move(job.id, JobStatus.IN_PROGRESS, report=False):
            self._release(job.id)
            return
        try:
            execute(self._need_app(), name, args, origin=ORIGIN, job_id=job.id, wait=False)
        except BusyError as e:  # another front end took the queue a moment ago
            self._finish(job.id, JobStatus.REJECTED, f"busy: job {e.job_id} is running")
            return
        except OtaError as e:
            self._finish(job.id, JobStatus.FAILED, str(e))
            return
        self._active = _Active(job, name)
        what = f"installing from {job.url}" if job.type is JobType.INSTALL else f"{name} started"
        self._emit(job.id, JobStatus.IN_PROGRESS, what)

    def _run_stream(self, job: Job) -> None:
        """An install-stream job: `App.install` from the job's chunk stream (agent.mqtt.stream),
        which subscribes to the job's chunk topic when the install opens it and unsubscribes
        when it closes; from then on the same two phases as an install job."""
        if not self._move(job.id, JobStatus.IN_PROGRESS, report=False):
            self._release(job.id)
            return
        app, channel = self._need_app(), self._need_channel()
        assert job.size is not None
        assert job.sha256 is not None
        source = MqttStreamSource(channel.link, channel.topics.chunks(job.id), channel.topics.credit(job.id),
                                  size=job.size, sha256=job.sha256, chunk_size=job.chunk_size,
                                  limits=app.device.config.download)
        allow = job.allow_downgrade

        def work(ctx: JobContext) -> InstallOutcome:
            return app.install(ctx, source, allow_downgrade=allow)

        try:
            app.queue.submit("install", work, origin=ORIGIN, job_id=job.id)
        except BusyError as e:
            self._finish(job.id, JobStatus.REJECTED, f"busy: job {e.job_id} is running")
            return
        self._active = _Active(job, "install")
        self._emit(job.id, JobStatus.IN_PROGRESS, f"installing from {job.size} bytes streamed over MQTT in chunks "
                                                  f"of {job.chunk_size}")

    def _status_job(self, job: Job) -> None:
        if not self._move(job.id, JobStatus.IN_PROGRESS, report=False):
            return
        self._publish_status(force=True)
        doc = execute(self._need_app(), "status", {}, origin=ORIGIN).result or {}
        booted = doc.get("booted")
        slot = doc["slots"].get(booted) if booted else None
        version = slot.get("version") if isinstance(slot, dict) else None
        reason = f"status published on {self._need_channel().topics.status}"
        self._finish(job.id, JobStatus.SUCCEEDED, reason, bundle_version=version, slot=booted)

    def _cancel_job(self, job: Job) -> None:
        target = job.target or ""
        if not self._move(job.id, JobStatus.IN_PROGRESS, report=False):
            return
        if target in self._waiting:
            self._finish(job.id, JobStatus.FAILED, f"job {target} is installed and waits for the boot that decides "
                                                    "it; it cannot be canceled (send a rollback job after it)")
            return
        try:
            execute(self._need_app(), "cancel", {"job": target}, origin=ORIGIN, job_id=job.id)
        except OtaError as e:
            self._finish(job.id, JobStatus.FAILED, str(e))
            return
        self._finish(job.id, JobStatus.SUCCEEDED, f"cancel of job {target} requested: it stops at its next safe point")

    # ---- a job of the queue changed -------------------------------------------------------------------

    def _job_changed(self, view: JobView) -> None:
        self._need_channel().reporter.wake()  # the job's own events (install, reboot, commit, ...)
        active = self._active
        if view.state.final and active is not None and view.id == active.job.id and view.origin == ORIGIN:
            self._active = None
            if active.phase == "install":
                self._install_done(active, view)
            elif active.outcome is not None:
                self._reboot_done(active, view)
            else:
                self._command_done(active, view)
        self._publish_status()

    def _install_done(self, active: _Active, view: JobView) -> None:
        job = active.job
        if view.state is not JobState.SUCCEEDED:
            self._finish(job.id, self._failure_status(view), view.error or view.state.value,
                         conflicts=self._failed_conflicts(view.id))
            return
        outcome: InstallOutcome = view.result
        if outcome.result is InstallResult.ALREADY_INSTALLED:
            if outcome.slot == self._booted():  # runs it, committed (an install refuses a booted trial)
                self._move(job.id, JobStatus.INSTALLED, outcome.reason, version=outcome.bundle_version,
                           slot=outcome.slot)
                self._finish(job.id, JobStatus.SUCCEEDED, outcome.reason, bundle_version=outcome.bundle_version,
                             slot=outcome.slot)
            else:  # pending in the other slot for another install, which reports its own outcome
                self._finish(job.id, JobStatus.FAILED, outcome.reason, bundle_version=outcome.bundle_version,
                             slot=outcome.slot)
            return
        reboot = self.config.reboot_after_install
        reason = (f"version {outcome.bundle_version} written to slot {outcome.slot} and read back; "
                  + ("rebooting to try it" if reboot else "it is tried on the next boot"))
        self._move(job.id, JobStatus.INSTALLED, reason, version=outcome.bundle_version, slot=outcome.slot,
                   conflicts=outcome.etc_conflicts)
        if reboot:
            self._reboot_into(job, outcome)
        else:
            self._wait_for_boot(job.id)

    def _reboot_into(self, job: Job, outcome: InstallOutcome) -> None:
        try:
            execute(self._need_app(), "reboot", {}, origin=ORIGIN, job_id=job.id, wait=False)
        except OtaError as e:  # busy: another front end started a job in between
            log.warning("mqtt: job %s is installed but the reboot was not started: %s", job.id, e)
            self._emit(job.id, JobStatus.INSTALLED, f"version {outcome.bundle_version} written to slot "
                       f"{outcome.slot}; the reboot was not started ({e}): it is tried on the next boot",
                       version=outcome.bundle_version, slot=outcome.slot)
            self._wait_for_boot(job.id)
            return
        self._active = _Active(job, "reboot", outcome)

    def _reboot_done(self, active: _Active, view: JobView) -> None:
        outcome = active.outcome
        assert outcome is not None
        if view.state is not JobState.SUCCEEDED:
            log.warning("mqtt: job %s: the reboot failed: %s", active.job.id, view.error)
            self._emit(active.job.id, JobStatus.INSTALLED, f"version {outcome.bundle_version} written to slot "
                       f"{outcome.slot}; the reboot failed ({view.error}): it is tried on the next boot",
                       version=outcome.bundle_version, slot=outcome.slot)
        self._wait_for_boot(active.job.id)
        self._settle(active.job.id)  # a simulated device has booted and decided by now

    def _command_done(self, active: _Active, view: JobView) -> None:
        job = active.job
        if view.state is not JobState.SUCCEEDED:
            self._finish(job.id, self._failure_status(view), view.error or view.state.value)
            return
        if isinstance(view.result, RollbackOutcome) and view.result.rebooting:
            self._wait_for_boot(job.id)
            self._settle(job.id)
            return
        text = getattr(view.result, "reason", None) or f"{active.phase} done"
        if job.type is JobType.REBOOT:
            if not self.reboot_in_process:  # the system is going down: done when the agent is back
                self._emit(job.id, JobStatus.IN_PROGRESS, "reboot requested; it succeeds when the agent is back")
                self._release(job.id)
                return
            text = f"rebooted; booted slot {self._booted()}"
        self._finish(job.id, JobStatus.SUCCEEDED, text)

    @staticmethod
    def _failure_status(view: JobView) -> JobStatus:
        if view.state is JobState.CANCELED:
            return JobStatus.CANCELED
        if view.error_type in REFUSALS and view.progress is None:  # refused before anything was written
            return JobStatus.REJECTED
        return JobStatus.FAILED

    # ---- the boot's verdict ------------------------------------------------------------------------------

    def _wait_for_boot(self, job_id: str) -> None:
        record = self._need_channel().journal.get(job_id)
        if record is not None:
            self._waiting[job_id] = record
        self._release(job_id)

    def _facts(self) -> tuple[Any, list[Event]]:
        device = self._need_app().device
        state = device.store.load()
        events = [r.event for r in device.events.outbox.pending()]
        if state.last_result is not None:
            events.append(state.last_result)
        return state.trial, events

    def _settle(self, job_id: str) -> None:
        record = self._waiting.get(job_id)
        if record is None:
            return
        trial, events = self._facts()
        found = settle.verdict(job_id, trial, events)
        if found is None:
            return
        del self._waiting[job_id]
        status = found.status
        if not record.type.installs:
            status = settle.rollback_result(found).status or JobStatus.FAILED
        self._finish(job_id, status, found.reason)

    def _resume(self, record: JobRecord) -> None:
        """A job that had started before the agent (re)started."""
        device = self._need_app().device
        trial, events = self._facts()
        booted = self._booted()
        pending = False
        if trial is not None and trial.txn == record.id and booted is not None:
            pending = trial.slot != booted and model.next_boot(device.bootloader.state()) == trial.slot
        step = settle.after_restart(record, trial, events, booted=booted, pending=pending,
                                    reboot_after_install=self.config.reboot_after_install)
        log.info("mqtt: job %s had started before this agent started (%s): %s%s", record.id, record.status.value,
                 step.next.value, f" ({step.status.value}: {step.reason})" if step.status else "")
        if step.status is not None:
            if step.status in (JobStatus.SUCCEEDED, JobStatus.ROLLED_BACK) and record.type.installs:
                self._move(record.id, JobStatus.INSTALLED, "written and read back before the agent restarted")
            installed = step.installed
            self._move(record.id, step.status, step.reason, version=installed.bundle_version if installed else None,
                       slot=installed.slot if installed else None)
        if step.next is settle.Next.REBOOT and step.installed is not None:
            with self._lock:
                free = self._claimed is None and self._need_app().queue.running() is None
                if free:
                    self._claimed = record.id
            if free:
                t = step.installed
                self._reboot_into(record.job, InstallOutcome(record.id, t.bundle_version, t.slot, t.security_version))
                return
            step = settle.Step(None, "", settle.Next.WAIT)
        if step.next is not settle.Next.DONE:
            self._waiting[record.id] = record
            self._settle(record.id)

    # ---- recording steps ------------------------------------------------------------------------------------

    def _move(self, job_id: str, status: JobStatus, reason: str = "", *, report: bool = True,
              version: str | None = None, slot: str | None = None, conflicts: tuple[EtcConflict, ...] = ()) -> bool:
        """Journal a step (durable), then report it through the outbox. False when the journal refused."""
        try:
            self._need_channel().journal.set_status(job_id, status, reason)
        except (JournalError, TransitionError) as e:
            log.error("mqtt: job %s: cannot record %s: %s", job_id, status.value, e)
            return False
        if report:
            self._emit(job_id, status, reason, version=version, slot=slot, conflicts=conflicts)
        return True

    def _finish(self, job_id: str, status: JobStatus, reason: str, *, bundle_version: str | None = None,
                slot: str | None = None, conflicts: tuple[EtcConflict, ...] = ()) -> None:
        self._move(job_id, status, reason, version=bundle_version, slot=slot, conflicts=conflicts)
        self._release(job_id)
        self._publish_status()

    def _emit(self, job_id: str, status: JobStatus, reason: str, *, version: str | None = None,
              slot: str | None = None, conflicts: tuple[EtcConflict, ...] = ()) -> None:
        device = self._need_app().device
        log.info("mqtt: job %s: %s%s", job_id, status.value, f" - {clean(reason)}" if reason else "")
        event = reports.job_event(job_id, status, reason, bundle_version=version, slot=slot, conflicts=conflicts)
        device.events.emit(event, level=logging.DEBUG)
        self._need_channel().reporter.wake()

    def _failed_conflicts(self, txn: str) -> tuple[EtcConflict, ...]:
        """The /etc conflicts that failed the install `txn`, from the result it recorded."""
        with contextlib.suppress(OtaError):
            last = self._need_app().device.store.load().last_result
            if last is not None and last.txn == txn:
                return last.conflicts
        return ()

    def _release(self, job_id: str) -> None:
        with self._lock:
            if self._claimed == job_id:
                self._claimed = None

    # ---- status ------------------------------------------------------------------------------------------

    def _publish_status(self, *, force: bool = False) -> None:
        self._status_checked = time.monotonic()
        channel, app = self._need_channel(), self._need_app()
        if not channel.link.connected:
            self._status_sent = None  # publish again once connected
            return
        try:
            state = reports.status_state(app.status().to_json())
        except OtaError as e:  # a damaged bootloader state, say: say so once, keep trying
            if str(e) != self._status_error:
                log.error("mqtt: cannot read the device's status to publish it: %s", e)
            self._status_error = str(e)
            return
        self._status_error = ""
        key = encode(state)
        if key == self._status_sent and not force:
            return
        doc = reports.status_report(channel.topics.device, self.config.groups, state, app.device.clock())
        if channel.link.publish(channel.topics.status, encode(doc), qos=1, retain=True) is not None:
            self._status_sent = key

    def _booted(self) -> str | None:
        try:
            return self._need_app().device.bootloader.booted_slot()
        except OtaError:
            return None

    # ---- plumbing ----------------------------------------------------------------------------------------

    def _route(self, record: Record) -> Message:
        if self._router is None:
            self._router = reports.route(self._need_channel().topics, self._group_of)
        return self._router(record)

    def _group_of(self, job_id: str) -> str | None:
        known = self._need_channel().journal.get(job_id)
        return known.group if known is not None else None

    def _need_app(self) -> App:
        if self._app is None:
            raise RuntimeError("the MQTT front end is not started")
        return self._app

    def _need_channel(self) -> MqttChannel[Record]:
        if self._channel is None:
            raise RuntimeError("the MQTT front end is not started")
        return self._channel


class _LinkEvents:
    """The link's callbacks (paho's thread), turned into worker tasks."""

    def __init__(self, tasks: queue.SimpleQueue[tuple[str, Any]]) -> None:
        self.tasks = tasks

    def link_up(self, session_present: bool) -> None:
        self.tasks.put(("connected", None))

    def link_down(self) -> None:
        pass

    def published(self, mid: int, ok: bool, reason: str) -> None:
        pass
