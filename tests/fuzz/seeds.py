"""Seed corpora for the fuzz harnesses, generated (nothing binary is kept in
the repository): small valid bundles signed with the fuzz test key, their
manifests, op tables and zstd frames, PEM keys, a device config, an agent
state and an outbox, each written as the real code writes them.

Usage: python -m tests.fuzz.seeds DIR   (writes DIR/HARNESS/seed-N files)
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives import serialization

from agent.events import Event
from agent.outbox import EventLog
from agent.state import AgentState, SlotRecord, StateStore, Trial
from bundler import executor
from bundler.executor import Inputs, make_op
from bundler.format.manifest import ImageEntry, Manifest
from bundler.format.ops import Op, OpType, pack_table
from bundler.format.writer import write_bundle
from bundler.planner import plan_delta
from ota_common.frames import encode as encode_frame
from tests.fuzz import delta_pair
from tests.fuzz._harness import TEST_KEY

HARNESSES = (
    "bundle", "resigned", "manifest", "ops", "delta", "keys", "config", "state", "outbox", "console", "mqtt", "media",
    "oci",
)


def _image(parts: list[bytes | int]) -> tuple[list[Op], bytes, bytes]:
    """Ops, payload and image for extents given as data (REPLACE) or a length (ZERO)."""
    ops: list[Op] = []
    payload = image = b""
    for part in parts:
        if isinstance(part, int):
            ops.append(Op(OpType.ZERO, len(image), part))
            image += bytes(part)
            continue
        frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(part)
        digest, frame_digest = hashlib.sha256(part).digest(), hashlib.sha256(frame).digest()
        ops.append(Op(OpType.REPLACE, len(image), len(part), len(payload), len(frame), frame_digest, digest))
        payload += frame
        image += part
    return ops, payload, image


def bundles() -> list[tuple[Manifest, bytes]]:
    out = []
    specs: list[tuple[list[list[bytes | int]], datetime | None]] = [
        ([[4096]], None),
        ([[b"edge-ota " * 500, 8192, bytes(range(256)) * 7]], datetime(2030, 1, 1, tzinfo=UTC)),
        ([[b"rootfs" * 300], [2048, b"appfs" * 100]], None),
    ]
    for images_parts, expires in specs:
        ops: list[Op] = []
        payload = b""
        images = []
        for n, parts in enumerate(images_parts):
            image_ops, image_payload, image = _image(parts)
            shifted = [
                Op(
                    o.type,
                    o.dst_offset,
                    o.dst_length,
                    o.payload_offset + len(payload) if o.payload_length else 0,
                    o.payload_length,
                    o.payload_sha256,
                    o.dst_sha256,
                )
                for o in image_ops
            ]
            images.append(
                ImageEntry(
                    ("rootfs", "appfs")[n], len(image), hashlib.sha256(image).hexdigest(), len(ops), len(shifted)
                )
            )
            ops += shifted
            payload += image_payload
        manifest = Manifest(
            bundle_version=f"1.{len(out)}.0",
            security_version=len(out),
            compatible="fuzz-board",
            created=datetime(2026, 1, 1, tzinfo=UTC),
            expires=expires,
            images=tuple(images),
            op_count=len(ops),
            op_table_sha256=hashlib.sha256(pack_table(ops)).hexdigest(),
            payload_length=len(payload),
        )
        buf = io.BytesIO()
        write_bundle(buf, manifest, ops, io.BytesIO(payload), [TEST_KEY])
        out.append((manifest, buf.getvalue()))
    return out


CONFIG = b"""[device]
compatible = "fuzz-board"
state_dir = "state"
keyring = "keys"
cmdline = "cmdline"

[bootloader]
backend = "sim"
path = "bootloader.json"
tries = 3
reboot_command = []

[[slots]]
bootname = "A"
class = "rootfs"
path = "slot-A.img"

[[slots]]
bootname = "B"
class = "rootfs"
path = "slot-B.img"

[health]
deadline = 30
commands = [["true"]]
units = ["ssh.service"]

[watchdog]
backend = "none"
timeout = 30
"""


MQTT_SEEDS = [
    b'{"job_id": "j1", "type": "install", "url": "https://example.com/b.otab", "sha256": "'
    + b"ab" * 32 + b'", "expires": "2030-01-01T00:00:00Z"}',
    b'{"job_id": "j2", "type": "reboot"}',
    b'{"credit": 4, "offset": 0}',
    b'{"report_id": "r1", "job_id": "j1", "status": "succeeded"}',
]


def _oci_seeds() -> list[bytes]:
    """A small layer tar (a directory, a file, a symlink, a whiteout), an index, references."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in (("etc", tarfile.DIRTYPE, b""), ("etc/hostname", tarfile.REGTYPE, b"gw\n"),
                                 ("etc/link", tarfile.SYMTYPE, b""), ("etc/.wh.old", tarfile.REGTYPE, b"")):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data)
            info.linkname = "hostname" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(data))
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "ab" * 32, "size": 500,
         "platform": {"os": "linux", "architecture": "amd64"},
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    return [b"\x00" + buf.getvalue(), b"\x01" + json.dumps(index).encode(),
            b"\x02oci://registry.example:5000/edge/gw@sha256:" + b"cd" * 32, b"\x02oci://localhost/a/b:1.0"]


def _delta_seeds() -> list[bytes]:
    """Every DELTA op the bundler plans for tests.fuzz.delta_pair, record then payload,
    made with the x86 filter on (so X86 pieces and extents are among them)."""
    base, target = delta_pair.pair()
    planned = [p for p in plan_delta(target, len(target), base, len(base)) if p.type is OpType.DELTA]
    was, executor.X86_FILTER = executor.X86_FILTER, True
    try:
        made = [make_op(p, Inputs(target, base), 3) for p in planned]
    finally:
        executor.X86_FILTER = was
    return [op.pack() + payload for op, payload in made if op.type is OpType.DELTA]


def seeds() -> dict[str, list[bytes]]:
    made = bundles()
    frames = [zstandard.ZstdCompressor(level=1).compress(b"x" * 5000), zstandard.ZstdCompressor().compress(b"")]
    ops_seeds = []
    for manifest, data in made:
        start = 64 + len(manifest.encode()) + 102
        table = data[start : start + manifest.op_count * 128]
        ops_seeds.append(b"\x01" + manifest.images[0].size.to_bytes(8, "little") + table)
    for frame, length in zip(frames, (5000, 1), strict=True):
        ops_seeds.append(b"\x00" + length.to_bytes(8, "little") + frame)
    pem = serialization.Encoding.PEM
    keys = [
        TEST_KEY.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
        TEST_KEY.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp))
        last = Event(
            event="install",
            result="ok",
            reason="installed",
            txn="abc123",
            bundle_version="1.0",
            slot="B",
            time="2026-01-01T00:00:00Z",
        )
        trial = Trial("B", "abc123", "1.0", 3, "ab" * 32, installed=True)
        store.save(AgentState(3, {"A": SlotRecord("0.9", "cd" * 32, 2, "2025-12-01T00:00:00Z")}, trial, last))
        state = [store.path.read_bytes(), b"{}"]
        log = EventLog(Path(tmp), clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
        log.emit(
            Event(
                event="install",
                result="started",
                reason="bundle verified",
                txn="abc123",
                bundle_version="1.0",
                slot="B",
            )
        )
        log.emit(Event(event="install", result="failed", reason="payload: op 3: zstd frame does not decode"))
        outbox = [log.outbox.path.read_bytes()]
    return {
        "bundle": [data for _, data in made],
        "resigned": [data for _, data in made],
        "manifest": [m.encode() for m, _ in made],
        "ops": ops_seeds,
        "delta": _delta_seeds(),
        "keys": keys,
        "config": [CONFIG],
        "state": state,
        "outbox": outbox,
        "console": [b"\x07status\r\njson on\r" + encode_frame(7, 0, b"payload" * 40) + b"@ack 7 0 4096\r",
                    b"\x00" + b"x" * 5000 + b"\r" + encode_frame(1, 4096, bytes(300))],
        "mqtt": MQTT_SEEDS,
        "oci": _oci_seeds(),
        # mkdir "edge-ota", a bundle in it, a link and a FIFO named like bundles, up, a file at the top
        "media": [b"\x00\x07edge-ota\x02\x03v20\x03\x04evil\x04\x04fifo\x01\x00\x02\x03top"],
    }


def write(directory: Path) -> dict[str, Path]:
    out = {}
    for harness, items in seeds().items():
        d = directory / harness
        d.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(items):
            (d / f"seed-{i}").write_bytes(data)
        out[harness] = d
    return out


if __name__ == "__main__":
    for name, path in write(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
