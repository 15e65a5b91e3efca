"""A device for the MQTT component tests: the real MQTT channel (link, journal,
intake, reporter) with a small job sink, in this process (`start_device`) or
as a child process (`python -m tests.component._mqtt_device SPEC.json`) that a
test can SIGKILL, or that kills itself at a named crash point.

The sink "runs" a job at once: it appends the job id to a file (fsynced, so a
test can count runs across processes) and moves the job through in-progress
to succeeded in the journal, as the application layer will.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.mqtt.channel import MqttChannel
from agent.mqtt.config import load_mqtt
from agent.mqtt.intake import JobAnswer
from agent.mqtt.journal import Journal
from agent.mqtt.schema import Job, JobStatus
from tests.fakes.outbox import FakeOutbox, FakeRecord, route


class FileSink:
    def __init__(self, runs: Path, *, run: bool = True) -> None:
        self.runs = runs
        self.run = run
        self.journal: Journal | None = None
        self.jobs: list[Job] = []

    def submit(self, job: Job) -> JobAnswer:
        self.jobs.append(job)
        fd = os.open(self.runs, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{job.id}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.run and self.journal is not None:
            self.journal.set_status(job.id, JobStatus.IN_PROGRESS)
            self.journal.set_status(job.id, JobStatus.SUCCEEDED, "done by the test sink")
        return JobAnswer.queued()

    def run_ids(self) -> list[str]:
        return self.runs.read_text().split() if self.runs.exists() else []


def utcnow() -> datetime:
    return datetime.now(UTC)


def start_device(
    state_dir: Path, mqtt: dict[str, Any], *, run: bool = True, outbox: FakeOutbox | None = None
) -> tuple[MqttChannel[FakeRecord], FileSink, FakeOutbox]:
    state_dir.mkdir(parents=True, exist_ok=True)
    config = load_mqtt({"reconnect_min": 1, "reconnect_max": 2, **mqtt}, state_dir / "agent.toml")
    sink = FileSink(state_dir / "runs", run=run)
    outbox = outbox if outbox is not None else FakeOutbox()
    channel = MqttChannel(config, state_dir=state_dir, sink=sink, outbox=outbox, route=route, clock=utcnow)
    sink.journal = channel.journal
    channel.start()
    return channel, sink, outbox


def main(spec_path: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    channel, _, _ = start_device(Path(spec["state_dir"]), spec["mqtt"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if channel.link.wait_ready(30):
        print("ready", flush=True)
    stop.wait()
    channel.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
