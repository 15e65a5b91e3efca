"""`ota-fleet deploy --file`: the operator's side of an install-stream job. The
bundle goes to one device over the broker in chunks, only as far as the device's
credit allows (docs/mqtt.md, agent.mqtt.stream has the device's side).

Chunks are read from the file one at a time and published at QoS 1 without
waiting for each PUBACK: the device's credit is the flow control, so at most a
window of chunks is ever in flight. A credit with `"resend": true` (the device
saw no chunk for a while) rewinds to the offset it names; `"closed": true` (the
device stopped reading) ends the sending.

Owns the chunk sending; the job and its reports are deploy.py's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, BinaryIO

from paho.mqtt.enums import MQTTErrorCode

from agent.mqtt.schema import chunk_message, parse_credit
from bundler.fleet.broker import FleetClient, FleetError
from ota_common.text import clean

log = logging.getLogger(__name__)


def digest(path: Path) -> tuple[int, str]:
    """The size and SHA-256 of the bundle file."""
    h = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
    except OSError as e:
        raise FleetError(f"--file {clean(str(path), 200)}: {clean(e.strerror or e, 120)}") from None
    if size == 0:
        raise FleetError(f"--file {clean(str(path), 200)} is empty")
    return size, h.hexdigest()


class ChunkSender:
    """Sends the chunks of `path` on `topic` as credit documents arrive (`credit(payload)`)."""

    def __init__(self, client: FleetClient, topic: str, path: Path, size: int, chunk_size: int) -> None:
        self.client = client
        self.topic = topic
        self.size = size
        self.chunk_size = chunk_size
        self.sent = 0  # chunks below this offset have been published
        self.chunks = 0
        self.closed = False
        try:
            self._file: BinaryIO = path.open("rb")
        except OSError as e:
            raise FleetError(f"--file {clean(str(path), 200)}: {clean(e.strerror or e, 120)}") from None

    def credit(self, payload: bytes) -> None:
        doc: dict[str, Any] | None = parse_credit(payload)
        if doc is None:
            log.debug("ignoring a credit message that is not one")
            return
        if doc.get("closed"):
            self.closed = True
            return
        offset = int(doc["next"])
        if doc.get("resend") or offset > self.sent:
            self.sent = min(offset, self.size)
        limit = min(self.size, offset + int(doc["credit"]) * self.chunk_size)
        while self.sent < limit:
            self._file.seek(self.sent)
            data = self._file.read(min(self.chunk_size, self.size - self.sent))
            if not data:
                raise FleetError(f"the bundle file ended at {self.sent} of {self.size} bytes (it changed?)")
            info = self.client.client.publish(self.topic, chunk_message(self.sent, data), qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise FleetError(f"publishing a chunk on {clean(self.topic, 200)} failed (rc {info.rc})")
            self.sent += len(data)
            self.chunks += 1

    def close(self) -> None:
        self._file.close()
