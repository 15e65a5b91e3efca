"""One console's conversation: a line from the technician becomes a command of the
command table (`agent.commands`) or a console-only command, and its reply goes
back as text for people or, after `json on`, as one JSON object per line.

- Every command of the table is reachable, by the table's own names and
  parameters: string parameters positional in the table's order (or NAME=VALUE),
  booleans as --flag / --no-flag, integers as NAME=VALUE. A command added to the
  table later is reachable the same way, and asks for confirmation when it
  `changes_state`.
- Console-only: help, slots, log [N], progress, json on|off, collect-logs [DIR],
  upload SIZE SHA256 [--allow-downgrade] (then frames; agent.console.upload), bye.
- A state-changing command (and upload) is confirmed first: `yes`, or with
  technician keys configured, `response NONCE SIGNATURE` to the challenge the
  device printed (agent.console.auth). While a job runs it is answered "busy" at
  once, with the running job's progress.
- State-changing commands run as jobs of the shared queue: the reply says the job
  started, progress lines follow (at most one each PROGRESS_EVERY seconds), and
  the job's result ends it. The console stays usable meanwhile (status, progress).

JSON replies: {"command", "ok", "result" | "error": {"type", "message"}, "text"},
plus "job" (the job it concerns), "pending": true (the result follows) or
"done": true (the result of a job), "confirm": {...} (an answer is expected).
Progress lines are {"progress": JOB} (no "ok"). A status reply's "result" is the
document `ota-agent status --json` prints.

Owns what a line means and how a reply looks; not the port (agent.console.port)
nor what commands do (agent.actions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.actions import App
from agent.commands import COMMANDS, Command, Reply, execute, lookup, reply_of
from agent.console.auth import Challenge, Gate
from agent.console.config import ConsoleConfig
from agent.console.upload import ORIGIN, Upload
from agent.errors import BusyError
from agent.jobs import JobState, JobView
from agent.service import job_line
from agent.status import render
from ota_common.errors import OtaError
from ota_common.frames import MAX_PAYLOAD, Frame
from ota_common.fsutil import atomic_write
from ota_common.text import clean

log = logging.getLogger(__name__)

PROGRESS_EVERY = 2.0
LOG_DEFAULT, LOG_MAX = 20, 200
MAX_BUNDLE = 1 << 40
Send = Callable[[str], None]
LogLines = Callable[[int], list[str]]

CONSOLE_HELP = {
    "help": "this list",
    "slots": "each slot's version, boot state and path",
    "log [N]": f"the agent's last N log lines (default {LOG_DEFAULT}, at most {LOG_MAX})",
    "progress": "the running job and how far it is",
    "json on|off": "one JSON object per reply (for tools) or text (default)",
    "collect-logs [DIR]": "write status, pending reports and the log to a mounted USB stick",
    "upload SIZE SHA256 [--resume]": "receive a bundle over this line and install it (ota-console put)",
    "bye": "end the session (json off, pending confirmation dropped)",
}


class ConsoleError(OtaError):
    """A console line that is not a command the console knows how to run."""


@dataclass(slots=True)
class Answer:
    command: str
    ok: bool
    text: str
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, reply: Reply, command: str | None = None, **extra: Any) -> Answer:
        doc = reply.to_json()
        more = {"job": doc["job"]} if "job" in doc else {}
        text = reply.text if reply.error is None else f"error: {reply.error}"
        return cls(command or reply.command, reply.ok, text, reply.result, reply.error, reply.error_type,
                   {**more, **extra})

    @classmethod
    def failed(cls, command: str, e: Exception, **extra: Any) -> Answer:
        message = clean(str(e), 600)
        return cls(command, False, f"error: {message}", None, message, type(e).__name__, extra)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"command": self.command, "ok": self.ok}
        if self.error is not None:
            doc["error"] = {"type": self.error_type, "message": self.error}
        else:
            doc["result"] = self.result
        doc["text"] = self.text
        doc.update(self.extra)
        return doc


@dataclass(frozen=True, slots=True)
class _Pending:
    line: str
    run: Callable[[], Answer]
    challenge: Challenge | None


class Session:
    """The console of one port; lives as long as the port is served (the upload and
    the failure count outlive a technician's session, which `reset` ends)."""

    def __init__(self, app: App, config: ConsoleConfig, gate: Gate, send: Send, log_lines: LogLines, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.config = config
        self.gate = gate
        self._raw_send = send
        self._out_lock = threading.Lock()
        self._holder: int | None = None  # the thread answering a line: others' lines wait for its replies
        self._deferred: list[str] = []
        self.log_lines = log_lines
        self.clock = clock
        self.json = False
        self.pending: _Pending | None = None
        self.upload: Upload | None = None
        self.last_upload: tuple[Upload, Answer] | None = None  # the last upload's result, for a late resume
        self.last_input = clock()
        self.active = False  # something arrived since the last reset
        self._lock = threading.Lock()
        self._watching: dict[str, tuple[Command | None, float]] = {}  # job id -> (command, last progress time)
        self._noise_reported = 0.0
        self._noise_suppressed = 0

    # --- output ------------------------------------------------------------------------

    def _send(self, line: str) -> None:
        """Any thread. While a line is being answered, what other threads say (a job's
        result, an upload's credit) waits until that line's replies are out."""
        with self._out_lock:
            if self._holder is not None and self._holder != threading.get_ident():
                self._deferred.append(line)
            else:
                self._raw_send(line)

    @contextlib.contextmanager
    def _answering(self) -> Iterator[None]:
        with self._out_lock:
            self._holder = threading.get_ident()
        try:
            yield
        finally:
            with self._out_lock:
                self._holder = None
                for line in self._deferred:
                    self._raw_send(line)
                self._deferred.clear()

    def emit(self, answer: Answer) -> None:
        if answer is _SILENT:
            return
        if self.json:
            self._send(json.dumps(answer.to_json(), sort_keys=True, separators=(",", ":")))
        else:
            for line in answer.text.splitlines() or [""]:
                self._send(line)

    def notice(self, text: str, **doc: Any) -> None:
        """A line that answers no command (noise, timeouts): text, or a JSON object without "ok"."""
        if self.json:
            self._send(json.dumps({"notice": text, **doc}, sort_keys=True, separators=(",", ":")))
        else:
            self._send(text)

    def noise(self, what: str) -> None:
        """At most one noise notice a second; the rest are counted into the next."""
        now = self.clock()
        if now - self._noise_reported < 1.0:
            self._noise_suppressed += 1
            return
        more = f" (and {self._noise_suppressed} more since)" if self._noise_suppressed else ""
        self._noise_reported, self._noise_suppressed = now, 0
        self.notice(f"error: {what}{more}")

    # --- input -------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_input = self.clock()
        self.active = True

    def tick(self) -> None:
        """The idle timeout: a session silent for `idle_timeout` seconds is reset."""
        if self.active and self.clock() - self.last_input > self.config.idle_timeout:
            self.notice(f"session timed out after {self.config.idle_timeout:g} s of silence")
            self.reset()

    def reset(self) -> None:
        self.json = False
        self.pending = None
        self.active = False

    def frame(self, frame: Frame) -> None:
        with self._answering():
            self._frame(frame)

    def _frame(self, frame: Frame) -> None:
        self.touch()
        if self.upload is None:
            self.noise("a data frame but no upload is running (upload SIZE SHA256 first)")
            return
        self.upload.feed(frame)

    def bad_frame(self, transfer: int, offset: int, reason: str) -> None:
        self.touch()
        if self.upload is not None and transfer == self.upload.transfer:
            self.upload.nak(f"frame at {offset} refused: {reason}")
        else:
            self.noise(f"a damaged frame ({reason})")

    def line(self, text: str) -> None:
        with self._answering():
            self._line(text)

    def _line(self, text: str) -> None:
        self.touch()
        text = text.strip()
        if not text:
            return
        pending, self.pending = self.pending, None
        try:
            words = shlex.split(text)
        except ValueError as e:
            self.emit(Answer.failed("?", ConsoleError(f"cannot parse the line: {e}")))
            return
        if not words:
            return
        name, args = words[0], words[1:]
        if name == "response":
            self._response(args, pending)
            return
        if pending is not None:
            if pending.challenge is None and name in ("yes", "y"):
                self.emit(pending.run())
                return
            refused = ConsoleError(f"not confirmed; {pending.line!r} not run")
            self.emit(Answer.failed(pending.line.split(maxsplit=1)[0], refused))
            if name in ("no", "n", "yes", "y"):
                return
        try:
            self._dispatch(text, name, args)
        except OtaError as e:
            self.emit(Answer.failed(clean(name, 40), e))

    # --- commands ------------------------------------------------------------------------

    def _dispatch(self, text: str, name: str, args: list[str]) -> None:
        simple: dict[str, Callable[[list[str]], Answer]] = {
            "help": self._help, "slots": self._slots, "log": self._log, "progress": self._progress,
            "json": self._json, "collect-logs": self._collect_logs, "bye": self._bye,
        }
        if name in simple:
            self.emit(simple[name](args))
            return
        if name == "upload":
            try:
                size, sha256, allow = self._upload_args(args)
            except _Finished as done:
                self.emit(done.answer)
                return
            if self.upload is not None and self.upload.matches(size, sha256) and self._upload_live():
                self._attach()  # resuming: the same transfer, already authorised
                return
            self._confirm(text, lambda: self._start_upload(size, sha256, allow), changes_state=True)
            return
        command = lookup(name)
        checked = _table_args(command, args)
        if checked.get("source") == "-":
            raise ConsoleError(f"{name}: '-' is the agent's own standard input here; send the bundle with upload "
                               "(ota-console PORT put BUNDLE)")
        self._confirm(text, lambda: self._run(command, checked), changes_state=command.changes_state,
                      while_busy=command.while_busy)

    def _confirm(self, text: str, run: Callable[[], Answer], *, changes_state: bool, while_busy: bool = False) -> None:
        if not changes_state:
            self.emit(run())
            return
        name = text.split(maxsplit=1)[0]
        running = self.app.queue.running()
        if running is not None and not while_busy:
            self.emit(Answer.failed(name, BusyError(running.id, running.command), job=running.to_json(),
                                    progress=job_line(running)))
            return
        line = clean(text, 300)
        if not self.gate.required:
            self.pending = _Pending(line, run, None)
            prompt = f"{line}: changes the device; answer yes to go ahead"
            self.emit(Answer(name, True, prompt, extra={"confirm": {"command": line, "challenge": None}}))
            return
        challenge = self.gate.issue(line)
        self.pending = _Pending(line, run, challenge)
        prompt = (f"{line}: changes the device; sign this challenge with a technician key and answer "
                  f"'response {challenge.nonce} SIGNATURE' within {self.gate.ttl:g} s:\n{challenge.text}")
        self.emit(Answer(name, True, prompt, extra={"confirm": {"command": line, "challenge": challenge.text,
                                                                "nonce": challenge.nonce}}))

    def _response(self, args: list[str], pending: _Pending | None) -> None:
        try:
            if not self.gate.required:
                raise ConsoleError("no challenge was asked (no technician keys are configured); answer yes")
            if len(args) != 2:
                raise ConsoleError("usage: response NONCE SIGNATURE")
            challenge = self.gate.answer(args[0], args[1])
        except OtaError as e:
            self.emit(Answer.failed("response", e))
            return
        if pending is None or pending.challenge is None or pending.challenge.nonce != challenge.nonce:
            self.emit(Answer.failed("response", ConsoleError("that challenge's command is no longer waiting")))
            return
        self.emit(pending.run())

    def _run(self, command: Command, checked: dict[str, Any]) -> Answer:
        job_id = uuid.uuid4().hex[:12]
        if command.changes_state:
            self._watch(job_id, command)  # before it starts: a job may end before submit returns
        try:
            reply = execute(self.app, command.name, checked, origin=ORIGIN, wait=False, job_id=job_id)
        except OtaError as e:
            self._unwatch(job_id)
            running = self.app.queue.running()
            extra = {"job": running.to_json(), "progress": job_line(running)} if isinstance(e, BusyError) and running \
                else {}
            return Answer.failed(command.name, e, **extra)
        if reply.job is None:
            return Answer.of(reply)
        text = f"job {reply.job.id} ({command.name}) started; its result follows"
        return Answer(command.name, True, text, None, extra={"job": reply.job.to_json(), "pending": True})

    # --- jobs ----------------------------------------------------------------------------

    def _watch(self, job_id: str, command: Command | None) -> None:
        with self._lock:
            self._watching[job_id] = (command, 0.0)

    def _unwatch(self, job_id: str) -> None:
        with self._lock:
            self._watching.pop(job_id, None)

    def on_job(self, view: JobView) -> None:
        """A job queue listener (the job's thread): progress and the result of our jobs."""
        with self._lock:
            watched = self._watching.get(view.id)
            if watched is None:
                return
            command, last = watched
            now = self.clock()
            if view.state.final:
                del self._watching[view.id]
            elif view.state is JobState.RUNNING and view.progress is not None and now - last >= PROGRESS_EVERY:
                self._watching[view.id] = (command, now)
            else:
                return
        if not view.state.final:
            self.notice(job_line(view), progress=view.to_json())
            return
        if command is None:  # an upload's install
            answer = Answer.of(reply_of(COMMANDS["install"], view), "upload", done=True)
            if self.upload is not None and self.upload.job_id == view.id:
                self.last_upload = (self.upload, answer)
                self.upload = None
        else:
            answer = Answer.of(reply_of(command, view), done=True)
        self.emit(answer)

    # --- upload ------------------------------------------------------------------------

    def _upload_args(self, args: list[str]) -> tuple[int, str, bool]:
        allow, resume = "--allow-downgrade" in args, "--resume" in args
        rest = [a for a in args if a not in ("--allow-downgrade", "--resume")]
        if len(rest) != 2 or not rest[0].isdigit() or len(rest[0]) > 16 or not 1 <= int(rest[0]) <= MAX_BUNDLE:
            raise ConsoleError(f"usage: upload SIZE SHA256 [--allow-downgrade] [--resume] (SIZE 1..{MAX_BUNDLE})")
        sha256 = rest[1].lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ConsoleError("upload: SHA256 must be 64 hex digits")
        size = int(rest[0])
        done = self.last_upload
        if resume and done is not None and done[0].matches(size, sha256) and self.upload is None:
            raise _Finished(done[1])
        return size, sha256, allow

    def _upload_live(self) -> bool:
        job_id = self.upload.job_id if self.upload else None
        running = self.app.queue.running()
        return job_id is not None and running is not None and running.id == job_id

    def _attach(self) -> None:
        upload = self.upload
        assert upload is not None
        answer = Answer("upload", True, f"upload {upload.transfer}: resuming at byte {upload.next_offset}",
                        upload.describe(), extra={"pending": True})
        self.emit(answer)
        upload.resume()

    def _start_upload(self, size: int, sha256: str, allow_downgrade: bool) -> Answer:
        frame = min(self.config.frame_size, MAX_PAYLOAD)
        upload = Upload(size, sha256, frame, self.app.device.config.download, self._send)
        job_id = uuid.uuid4().hex[:12]
        self.upload, self.last_upload = upload, None
        self._watch(job_id, None)  # before it starts: a job may end before submit returns
        try:
            job = upload.start(self.app, job_id, allow_downgrade=allow_downgrade)
        except OtaError as e:
            self._unwatch(job_id)
            self.upload = None
            return Answer.failed("upload", e)
        text = (f"upload {upload.transfer}: send {size} bytes in frames of {frame} "
                f"(ota-console put); install job {job.id}")
        return Answer("upload", True, text, upload.describe(), extra={"job": job.to_json(), "pending": True})

    # --- console-only commands -------------------------------------------------------------

    def _help(self, args: list[str]) -> Answer:
        lines = ["commands of the device (state-changing ones ask for confirmation):"]
        for c in COMMANDS.values():
            lines.append(f"  {_usage(c):<36} {c.help}{' *' if c.changes_state else ''}")
        lines.append("console:")
        lines += [f"  {k:<36} {v}" for k, v in CONSOLE_HELP.items()]
        result = {"commands": {c.name: {"help": c.help, "changes_state": c.changes_state, "usage": _usage(c)}
                               for c in COMMANDS.values()}, "console": CONSOLE_HELP}
        return Answer("help", True, "\n".join(lines), result)

    def _slots(self, args: list[str]) -> Answer:
        doc = self.app.status().to_json()
        lines = [line for line in render(doc).splitlines() if line.startswith("slot ")]
        return Answer("slots", True, "\n".join(lines), {"booted": doc["booted"], "slots": doc["slots"]})

    def _log(self, args: list[str]) -> Answer:
        if len(args) > 1 or (args and not args[0].isdigit()):
            raise ConsoleError(f"usage: log [N] (N 1..{LOG_MAX})")
        n = max(1, min(int(args[0]) if args else LOG_DEFAULT, LOG_MAX))
        lines = self.log_lines(n)
        return Answer("log", True, "\n".join(lines) or "(no log lines yet)", {"lines": lines})

    def _progress(self, args: list[str]) -> Answer:
        running = self.app.queue.running()
        if running is None:
            return Answer("progress", True, "no job is running", {"job": None})
        return Answer("progress", True, job_line(running), {"job": running.to_json()})

    def _json(self, args: list[str]) -> Answer:
        if args not in (["on"], ["off"]):
            raise ConsoleError("usage: json on|off")
        self.json = args == ["on"]
        return Answer("json", True, f"json {args[0]}", {"json": self.json})

    def _bye(self, args: list[str]) -> Answer:
        answer = Answer("bye", True, "bye", {})
        self.emit(answer)
        self.reset()
        return _SILENT

    def _collect_logs(self, args: list[str]) -> Answer:
        if len(args) > 1:
            raise ConsoleError("usage: collect-logs [DIR] (DIR: a mounted USB stick)")
        target = Path(args[0]) if args else _first_medium(self.config.media_roots)
        if target is None:
            roots = ", ".join(map(str, self.config.media_roots))
            raise ConsoleError(f"collect-logs: no mounted medium under {roots}; plug in a USB stick or name its mount")
        if not os.path.ismount(target):
            raise ConsoleError(f"collect-logs: {clean(target, 200)} is not a mount point (a USB stick's)")
        device = self.app.device
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        doc: dict[str, Any] = {
            "time": now,
            "device": self.gate.device_id,
            "status": self.app.status().to_json(),
            "reports": [r.to_json() for r in device.events.outbox.pending()],
            "log": self.log_lines(LOG_MAX),
        }
        name = f"edge-ota-logs-{_safe(self.gate.device_id)}-{now.replace(':', '')}.json"
        data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        try:
            atomic_write(target / name, data, mode=0o644)
        except OSError as e:
            raise ConsoleError(f"collect-logs: cannot write {clean(target / name, 200)}: {e.strerror}") from None
        return Answer("collect-logs", True, f"wrote {target / name} ({len(data)} bytes)",
                      {"path": str(target / name), "bytes": len(data)})


class _Finished(OtaError):
    """`upload` of a bundle whose upload already ended: answered with that result."""

    def __init__(self, answer: Answer) -> None:
        super().__init__("upload finished")
        self.answer = answer


_SILENT = Answer("", True, "")


def _usage(c: Command) -> str:
    parts = [c.name]
    for p in c.params:
        if p.type is bool:
            parts.append(f"[--{'no-' if p.default else ''}{p.name.replace('_', '-')}]")
        elif p.type is str:
            parts.append(p.name.upper() if p.required else f"[{p.name.upper()}]")
        else:
            parts.append(f"[{p.name}=N]")
    return " ".join(parts)


def _table_args(command: Command, words: list[str]) -> dict[str, Any]:
    """Console words as the table's arguments (checked again by `execute`)."""
    params = {p.name: p for p in command.params}
    positional = [p for p in command.params if p.type is str]
    out: dict[str, Any] = {}
    for word in words:
        if word.startswith("--"):
            flag = word[2:].replace("-", "_")
            value = True
            if flag.startswith("no_") and flag[3:] in params:
                flag, value = flag[3:], False
            p = params.get(flag)
            if p is None or p.type is not bool:
                raise ConsoleError(f"{command.name}: unknown option {clean(word, 40)!r} (usage: {_usage(command)})")
            out[flag] = value
        elif "=" in word and word.split("=", 1)[0].replace("-", "_") in params:
            key, text = word.split("=", 1)
            p = params[key.replace("-", "_")]
            out[p.name] = _typed(command, p.name, p.type, text)
        else:
            free = [p for p in positional if p.name not in out]
            if not free:
                raise ConsoleError(f"{command.name}: too many arguments (usage: {_usage(command)})")
            out[free[0].name] = word
    return out


def _typed(command: Command, name: str, kind: type, text: str) -> Any:
    if kind is str:
        return text
    if kind is bool and text in ("true", "false"):
        return text == "true"
    if kind is int and text.lstrip("-").isdigit() and len(text) <= 20:
        return int(text)
    raise ConsoleError(f"{command.name}: {name}={clean(text, 40)!r} is not a {kind.__name__}")


def _first_medium(roots: tuple[Path, ...]) -> Path | None:
    for root in roots:
        try:
            entries = sorted(root.iterdir())[:64]
        except OSError:
            continue
        for entry in entries:
            candidates = [entry]
            if not os.path.ismount(entry) and entry.is_dir():  # /run/media/USER/LABEL
                try:
                    candidates = sorted(entry.iterdir())[:64]
                except OSError:
                    continue
            for c in candidates:
                if os.path.ismount(c):
                    return c
    return None


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:64]
