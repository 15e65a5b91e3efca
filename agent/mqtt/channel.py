"""The MQTT front end of one device, assembled: the link, the job journal, the
job intake and the outbox reporter, built from an `MqttConfig`.

This is the one object the application's composition root builds and binds:

    channel = MqttChannel(cfg, state_dir=..., sink=app, outbox=outbox, route=route)
    unsettled = channel.start()      # jobs that had started before a restart
    ... outbox.append(...); channel.reporter.wake()
    channel.journal.set_status(job.id, JobStatus.IN_PROGRESS)   # before acting on a job
    channel.stop()

`start()` hands jobs journalled "queued" (accepted, never started) to the sink
again before the link connects, so a job acknowledged to the broker is never
lost by a restart; it returns the ones that had started for the application
to settle (an "installed" job, for instance, becomes succeeded or rolled-back
from what the boot check found).

Owns the wiring only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Generic

from agent.mqtt.config import MqttConfig
from agent.mqtt.intake import JobIntake, JobSink
from agent.mqtt.journal import Clock, JobRecord, Journal
from agent.mqtt.link import Link
from agent.mqtt.reporter import Outbox, R, Reporter, Route
from agent.mqtt.topics import Topics
from ota_common.text import clean

log = logging.getLogger(__name__)

JOURNAL_NAME = "mqtt-jobs.journal"


class MqttChannel(Generic[R]):
    def __init__(
        self,
        config: MqttConfig,
        *,
        state_dir: Path,
        sink: JobSink,
        outbox: Outbox[R],
        route: Route[R],
        clock: Clock,
    ) -> None:
        self.config = config
        self.link = Link(config, clock=clock)
        self.journal = Journal(state_dir / JOURNAL_NAME, capacity=config.journal_jobs, clock=clock)
        self.intake = JobIntake(self.link.topics, self.journal, sink, self._answer, groups=config.groups, clock=clock)
        self.link.handler = self.intake.handle
        self.link.filters = self.intake.filters
        self.reporter: Reporter[R] = Reporter(self.link, outbox, route, window=config.report_window)

    @property
    def topics(self) -> Topics:
        return self.link.topics

    def start(self) -> list[JobRecord]:
        unsettled = self.intake.resume()
        self.reporter.start()
        self.link.start()
        return unsettled

    def stop(self, timeout: float = 5.0) -> None:
        self.reporter.stop(timeout)
        self.link.stop(timeout)

    def _answer(self, topic: str, payload: bytes) -> None:
        if self.link.publish(topic, payload, qos=1) is None:
            log.error("mqtt: the client queue is full; an answer on %s is lost (a replay of the job gets it again)",
                      clean(topic, 200))
