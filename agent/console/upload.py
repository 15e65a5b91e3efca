"""A bundle uploaded over the serial console, streamed into the normal install path.

The console's data frames (`ota_common.frames`) feed the same reassembly,
flow control, SHA-256 check and stall limit as an MQTT install stream: the upload
*is* an `agent.mqtt.stream.MqttStreamSource` whose "link" is the serial port. Its
chunk route is fed from the frames the port reads; its credit messages go out as
`@ack TRANSFER NEXT LIMIT` lines. So the install sees a `BundleSource` like any
other, with every check of the reader, policy and installer; nothing is staged on
disk, and what the device holds is bounded by the credit window.

Resuming: the upload outlives the technician's session and the cable. Until the
`[download]` stall limit passes without a frame, `upload SIZE SHA256` again (same
size and digest) re-attaches and is answered with the offset wanted next; the
client sends from there. Frames of another transfer, or beyond the granted window,
are answered `@nak` and dropped; duplicates (a repeated offset) are ignored; a
frame ahead of the one wanted waits in the window for the gap to fill; a frame
whose CRC fails is answered `@nak` with the offset wanted next (go back N).

Owns the mapping frames <-> stream; not the install (agent.actions) nor the port.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from agent.actions import App
from agent.config import DownloadConfig
from agent.installer import InstallOutcome
from agent.jobs import JobContext, JobView
from agent.mqtt.schema import CHUNK_HEADER
from agent.mqtt.stream import Handler, MqttStreamSource
from ota_common.frames import Frame, ack_line, nak_line

log = logging.getLogger(__name__)

ORIGIN = "console"
Send = Callable[[str], None]


class _SerialLink:
    """What the stream needs of a link (agent.mqtt.stream.ChunkLink), over the console."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self.handler: Handler | None = None

    def add_route(self, topic: str, handler: Handler, timeout: float) -> bool:
        self.handler = handler
        return True

    def remove_route(self, topic: str) -> None:
        self.handler = None

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        doc = json.loads(payload)
        if not doc.get("closed"):
            self.upload.send_credit(int(doc["next"]), int(doc["credit"]))
        return 0


class SerialUploadSource(MqttStreamSource):
    def __init__(self, link: _SerialLink, transfer: int, *, size: int, sha256: str, frame_size: int,
                 limits: DownloadConfig) -> None:
        super().__init__(link, f"console/{transfer}/frames", f"console/{transfer}/ack", size=size, sha256=sha256,
                         chunk_size=frame_size, limits=limits)
        self.name = f"console upload {transfer}"


class Upload:
    """One bundle upload: its transfer id, its source and the install job it feeds."""

    def __init__(self, size: int, sha256: str, frame_size: int, limits: DownloadConfig, send: Send) -> None:
        self.transfer = secrets.randbelow(1 << 32)
        self.size = size
        self.sha256 = sha256
        self.frame_size = frame_size
        self.send = send
        self.link = _SerialLink(self)
        self.source = SerialUploadSource(self.link, self.transfer, size=size, sha256=sha256, frame_size=frame_size,
                                         limits=limits)
        self.job: JobView | None = None
        self.job_id: str | None = None
        self.naks = 0
        self.frames = 0

    def start(self, app: App, job_id: str, *, allow_downgrade: bool = False) -> JobView:
        """Queue the install from this upload (BusyError when a job runs)."""
        source = self.source

        def work(ctx: JobContext) -> InstallOutcome:
            return app.install(ctx, source, allow_downgrade=allow_downgrade)

        self.job_id = job_id
        self.job = app.queue.submit("install", work, origin=ORIGIN, job_id=job_id)
        return self.job

    def matches(self, size: int, sha256: str) -> bool:
        return self.size == size and self.sha256 == sha256

    @property
    def next_offset(self) -> int:
        stream = self.source.stream
        return stream.state.expected if stream is not None else 0

    def send_credit(self, next_offset: int, credit: int) -> None:
        limit = min(self.size, next_offset + credit * self.frame_size)
        self.send(ack_line(self.transfer, next_offset, limit))

    def resume(self) -> None:
        """The credit again (after a reconnect): the client sends from `next`."""
        stream = self.source.stream
        if stream is not None:
            stream.grant()

    def feed(self, frame: Frame) -> None:
        self.frames += 1
        stream, handler = self.source.stream, self.link.handler
        if frame.transfer != self.transfer:
            self.nak(f"unknown transfer {frame.transfer}")
            return
        if stream is None or handler is None:
            self.nak("not receiving (the install has not opened the upload yet, or is done with it)")
            return
        if frame.offset >= stream.state.granted and frame.offset >= stream.state.expected:
            self.nak(f"the frame at offset {frame.offset} is beyond the granted window (below {stream.state.granted})")
            return
        handler(self.source.chunks_topic, CHUNK_HEADER.pack(frame.offset) + frame.payload)

    def nak(self, reason: str) -> None:
        self.naks += 1
        self.send(nak_line(self.transfer, self.next_offset, reason))

    def describe(self) -> dict[str, Any]:
        return {"transfer": self.transfer, "size": self.size, "sha256": self.sha256, "frame": self.frame_size,
                "next": self.next_offset, "job": self.job_id}
