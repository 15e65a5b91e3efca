"""`ota-fleet status`: each device's last known state, from the retained
topics the devices keep (`.../devices/<id>/status`: the agent's status
document; `.../devices/<id>/presence`: online, or offline by the last will).

With `--device ID` (repeatable) the tool subscribes to exactly those topics;
without, to `.../devices/+/status` and `.../devices/+/presence`. Retained
messages arrive right after the subscription (`FleetClient.sync` tells when
they all have), so the answer is immediate. A broker that delivers retained
messages only to exact-topic subscriptions (RabbitMQ before 3.13) answers the
wildcard form with nothing: name the devices with `--device` there.

Owns reading and rendering the retained state; nothing is published but the
client's own sync marker.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.mqtt.errors import JobError, TopicError
from agent.mqtt.schema import parse_report
from agent.mqtt.topics import check_name
from bundler.fleet.broker import BrokerOptions, FleetClient, FleetError, Message
from ota_common.text import clean


@dataclass
class DeviceView:
    device: str
    online: bool | None = None
    presence_time: str | None = None
    status_time: str | None = None
    groups: list[str] = field(default_factory=list)
    state: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.state or {}
        booted = s.get("booted")
        slots = s.get("slots")
        slot = slots.get(booted) if isinstance(slots, dict) and isinstance(booted, str) else None
        return {"device": self.device, "online": self.online, "presence_time": self.presence_time,
                "status_time": self.status_time, "groups": self.groups, "booted": booted,
                "version": slot.get("version") if isinstance(slot, dict) else None,
                "primary": s.get("primary"), "job": s.get("job"), "last_result": s.get("last_result"),
                "state": self.state}

    def line(self) -> str:
        doc = self.to_json()
        presence = {True: "online", False: "offline", None: "presence?"}[self.online]
        if self.state is None:
            return f"{self.device}  {presence}  no retained status"
        parts = [self.device, presence, f"booted {doc['booted'] or '?'}", f"version {doc['version'] or '?'}"]
        job = doc["job"]
        parts.append(f"job {job.get('id')} ({job.get('command')}) {job.get('state')}" if isinstance(job, dict)
                     else "idle")
        last = doc["last_result"]
        if isinstance(last, dict):
            parts.append(f"last: {last.get('event')} {last.get('result')} at {last.get('time')}: "
                         f"{clean(last.get('reason', ''), 160)}")
        return "  ".join(clean(p, 400) for p in parts)


def collect(client: FleetClient, root: str, devices: list[str] | None) -> dict[str, DeviceView]:
    if devices is not None:
        filters = [f"{root}/devices/{d}/{leaf}" for d in devices for leaf in ("status", "presence")]
    else:
        filters = [f"{root}/devices/+/status", f"{root}/devices/+/presence"]
    client.subscribe(filters)
    client.sync()
    views: dict[str, DeviceView] = {d: DeviceView(d) for d in devices or []}
    for message in client.drain():
        _apply(views, root, message, devices)
    return views


def _apply(views: dict[str, DeviceView], root: str, message: Message, devices: list[str] | None) -> None:
    head = f"{root}/devices/"
    if not message.topic.startswith(head):
        return
    device, _, leaf = message.topic[len(head):].partition("/")
    if leaf not in ("status", "presence") or (devices is not None and device not in devices):
        return
    try:
        doc = parse_report(message.payload)
    except JobError:
        return
    if doc["device"] != device:
        return
    view = views.setdefault(device, DeviceView(device))
    if leaf == "presence":
        view.online = bool(doc.get("online"))
        view.presence_time = doc.get("time") if isinstance(doc.get("time"), str) else None
    elif isinstance(doc.get("state"), dict):
        view.state = doc["state"]
        view.status_time = doc.get("time") if isinstance(doc.get("time"), str) else None
        groups = doc.get("groups")
        view.groups = [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []


def status(options: BrokerOptions, devices: list[str] | None, *, as_json: bool = False,
           out: TextIO | None = None) -> int:
    out = out or sys.stdout
    for device in devices or []:
        try:
            check_name("device", device)
        except TopicError as e:
            raise FleetError(f"--device: {e}") from None
    with FleetClient(options) as client:
        views = collect(client, options.root, devices)
    for name in sorted(views):
        view = views[name]
        print(json.dumps(view.to_json(), sort_keys=True) if as_json else view.line(), file=out)
    missing = [name for name, view in sorted(views.items()) if view.state is None]
    if devices is None and not views:
        print("ota-fleet: no device status is retained on the broker (a broker that delivers retained messages "
              "only to exact topics, such as RabbitMQ before 3.13, needs --device ID)", file=sys.stderr)
        return 1
    if devices is not None and missing:
        print(f"ota-fleet: no retained status for {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0
