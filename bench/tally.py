"""The broker-side view of the fleet benchmark: one MQTT 3.1.1 subscriber on
every device topic (`<root>/devices/#`) and every group job topic
(`<root>/groups/#`) that counts what passes through the broker, per phase,
per device and per kind of message, and timestamps job lifecycle reports.

Kinds (docs/mqtt.md, the topic layout): `status` (retained device state),
`presence`, `progress`, `events`, `job-status` (`.../jobs/<id>/status`), and
`job` (operator -> device). A group job (`<root>/groups/<g>/jobs/<id>`) sets
`job_seen`, the moment the broker delivered the deploy, from which the
benchmark measures. Job reports are kept per device: the first time each
status arrived, and how many reports were duplicates (the same report id
delivered again: at least once).

On mosquitto it also follows `$SYS/broker/publish/messages/{received,sent}`
(set `sys_interval 1`), the broker's own counts of PUBLISH packets.

Owns the subscriber; what the numbers mean is bench/fleet.py's.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

SYS_TOPICS = ("$SYS/broker/publish/messages/received", "$SYS/broker/publish/messages/sent")


@dataclass
class DeviceJob:
    first: dict[str, float] = field(default_factory=dict)  # status -> monotonic time of its first report
    success: str = ""  # the succeeded report's reason
    slot: str = ""  # and the slot it names
    reports: int = 0
    duplicates: int = 0
    ids: set[str] = field(default_factory=set)


class Tally:
    def __init__(self, host: str, port: int, root: str, *, sys_topics: bool = False) -> None:
        self.root = root
        self.phase = "connect"
        self.kinds: dict[str, Counter[str]] = {}
        self.per_device: dict[str, Counter[str]] = {}
        self.online: set[str] = set()  # devices that published their retained status
        self.jobs: dict[str, DeviceJob] = {}
        self.job_seen: float | None = None
        self.job_id: str | None = None
        self.sys: dict[str, int] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        filters = [(f"{root}/devices/#", 1), (f"{root}/groups/#", 1)]
        if sys_topics:
            filters += [(t, 0) for t in SYS_TOPICS]
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-tally-{time.time_ns()}",
                                  clean_session=True, protocol=paho.MQTTv311)
        self.client.on_connect = lambda client, *_: client.subscribe(filters)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=60)
        self.client.loop_start()
        if not self._subscribed.wait(30):
            raise RuntimeError(f"the tally subscriber got no SUBACK from {host}:{port}")

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        topic = msg.topic
        if topic.startswith("$SYS/"):
            with contextlib.suppress(ValueError):
                self.sys[topic.rsplit("/", 1)[1]] = int(msg.payload)
            return
        rest = topic[len(self.root) + 1 :].split("/")
        with self._lock:
            if rest[0] == "groups":
                if len(rest) == 4 and self.job_seen is None:
                    self.job_seen, self.job_id = now, rest[3]
                self.kinds.setdefault(self.phase, Counter())["group-job"] += 1
                return
            if rest[0] != "devices" or len(rest) < 3:
                return
            device, leaf = rest[1], rest[2:]
            if leaf == ["status"]:
                kind = "status"
                self.online.add(device)
            elif len(leaf) == 1:
                kind = leaf[0]
            elif len(leaf) == 3 and leaf[0] == "jobs" and leaf[2] == "status":
                kind = "job-status"
                self._job_report(device, bytes(msg.payload), now)
            elif len(leaf) == 2 and leaf[0] == "jobs":
                kind = "job"
            else:
                kind = "/".join(leaf)
            self.kinds.setdefault(self.phase, Counter())[kind] += 1
            self.per_device.setdefault(self.phase, Counter())[device] += 1

    def _job_report(self, device: str, payload: bytes, now: float) -> None:
        try:
            doc = json.loads(payload)
            status, report_id = str(doc["status"]), str(doc["id"])
        except (ValueError, KeyError, TypeError):
            return
        job = self.jobs.setdefault(device, DeviceJob())
        job.reports += 1
        if report_id in job.ids:
            job.duplicates += 1
            return
        job.ids.add(report_id)
        job.first.setdefault(status, now)
        if status == "succeeded":
            details = doc.get("details")
            job.success = str(doc.get("reason", ""))
            job.slot = str(details.get("slot", "")) if isinstance(details, dict) else ""

    # ---- reading (any thread) ----------------------------------------------------------------------

    def count_online(self) -> int:
        with self._lock:
            return len(self.online)

    def finals(self) -> dict[str, str]:
        """Each device's final job status so far."""
        terminal = ("succeeded", "failed", "rejected", "canceled", "timed-out", "rolled-back")
        with self._lock:
            out = {}
            for device, job in self.jobs.items():
                done = [s for s in terminal if s in job.first]
                if done:
                    out[device] = done[0]
            return out

    def snapshot(self) -> tuple[dict[str, Counter[str]], dict[str, Counter[str]], dict[str, DeviceJob]]:
        with self._lock:
            return ({k: Counter(v) for k, v in self.kinds.items()}, {k: Counter(v) for k, v in self.per_device.items()},
                    dict(self.jobs))
