"""`ota-fleet provision`: a factory station provisioning devices over serial consoles.

One worker thread per port, each driving one device through its console
(`bundler.console.link.DeviceLink`, JSON mode): `identity` (the device makes its
key and answers a CSR), the CSR signed with the factory CA when the station holds
one (`provision_ca`), then `provision` with the certificate, which writes
identity and config and, when the slots do not hold the image yet, waits for it:
the bundle is then uploaded over the console (framed, resumable:
`bundler.console.put`) as an install, which on such a device is the image for
every slot. A device whose image step was done already (a run cut after it) gets
no upload. `provision-status` before anything (the board's compatible string
against the bundle's: a wrong bundle is refused before anything is written) and
after (the record complete, the image the bundle's).

Every device ends as one JSON line appended to the factory log (`FactoryLog`:
device id, port, public key fingerprint, image version and hash, result, reason,
duration and the phases', station time), a progress line per port on stderr, and
a summary; the exit status is non-zero when any device failed.

Owns the per-device sequence and the log; not the wire (bundler.console) nor the
device's steps (agent.provision on the device).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bundler.fleet.provision_ca import FactoryCa, sign_csr
from bundler.format.manifest import Manifest, parse
from bundler.format.reader import BundleReader
from ota_common.errors import OtaError
from ota_common.text import clean

REASON_LIMIT = 300
WAITING = "waiting-for-image"  # the device's provision result before its image arrives


class StationError(OtaError):
    """The station cannot start (bundle, CA, log)."""


class Link(Protocol):
    """What a worker needs of a console link (bundler.console.link.DeviceLink)."""

    port: str

    def open(self) -> None: ...

    def close(self) -> None: ...

    def call(self, line: str, *, on_notice: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]: ...


Uploader = Callable[[Link, Path, str, Callable[[int, int], None]], dict[str, Any]]  # (link, bundle, args, progress)


@dataclass(frozen=True)
class StationSpec:
    ports: tuple[str, ...]
    bundle: Path
    log: Path
    ca: FactoryCa | None = None
    device_ids: tuple[str, ...] = ()  # one per port, in order; empty: each device names itself
    broker: str | None = None


@dataclass
class DeviceRecord:
    """One line of the factory log."""

    port: str
    result: str = "failed"  # provisioned | failed
    device_id: str | None = None
    public_key_sha256: str | None = None
    key_type: str | None = None
    image_version: str | None = None
    image_sha256: str | None = None
    certificate: bool = False
    uploaded: bool = False
    reason: str = ""
    duration_s: float = 0.0
    phases_s: dict[str, float] = field(default_factory=dict)
    steps_run: list[str] = field(default_factory=list)
    station_time: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bundle_manifest(path: Path) -> Manifest:
    """The bundle's manifest, parsed (the device verifies the signature; the station
    only needs what the image is)."""
    try:
        with path.open("rb") as f:
            head = BundleReader(f).read_head()
        return parse(head.manifest_bytes)
    except OSError as e:
        raise StationError(f"cannot read the bundle {path}: {e.strerror}") from None
    except OtaError as e:
        raise StationError(f"{path} is not a bundle: {e}") from None


class FactoryLog:
    """JSON lines appended (O_APPEND, one write per line, fsync) by every worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StationError(f"cannot open the factory log {path}: {e.strerror}") from None

    def append(self, record: DeviceRecord) -> None:
        line = json.dumps(record.to_json(), sort_keys=True).encode() + b"\n"
        with self.lock:
            os.write(self.fd, line)
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class Lines:
    """Progress lines, one writer at a time; a port's upload line at most every 25 %."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def say(self, port: str, text: str) -> None:
        with self.lock:
            self.stream.write(f"{port}: {text}\n")
            self.stream.flush()


def _b64_der(pem: str) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return "base64:" + base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def provision_one(link: Link, port_index: int, spec: StationSpec, manifest: Manifest, *, upload: Uploader,
                  lines: Lines, clock: Callable[[], float] = time.monotonic) -> DeviceRecord:
    """One device: ask what it is (nothing written), make its identity, sign its CSR,
    provision (uploading the bundle only when the slots do not hold it yet), check."""
    rec = DeviceRecord(port=link.port)
    started = clock()
    phase_start = started

    def phase(name: str) -> None:
        nonlocal phase_start
        now = clock()
        rec.phases_s[name] = round(now - phase_start, 3)
        phase_start = now

    try:
        link.open()
        before = link.call("provision-status")["result"]
        if before.get("compatible") != manifest.compatible:
            raise StationError(f"the bundle is for {manifest.compatible!r}, the device is "
                               f"{clean(before.get('compatible'), 80)!r}: refused, nothing written")
        if before.get("complete"):
            raise StationError(f"already provisioned as device {clean(before.get('device_id'), 64)} "
                               f"at {clean(before.get('provisioned'), 40)}")
        phase("connect")
        words = ["identity"]
        if spec.device_ids:
            words.append(f"device_id={spec.device_ids[port_index]}")
        ident = link.call(" ".join(words))["result"]
        rec.device_id, rec.public_key_sha256 = ident["device_id"], ident["public_key_sha256"]
        rec.key_type = ident["key_type"]
        lines.say(link.port, f"device {rec.device_id}: {rec.key_type} key {str(rec.public_key_sha256)[:16]}")
        args = ["provision"]
        if spec.ca is not None:
            issued = sign_csr(spec.ca, ident["csr"])
            if issued.fingerprint != rec.public_key_sha256 or issued.device_id != rec.device_id:
                raise StationError("the CSR is not for the key and id the device reported")
            args += [f"cert={_b64_der(issued.cert_pem)}", f"ca_cert={_b64_der(spec.ca.cert_pem)}"]
            rec.certificate = True
        if spec.broker:
            args.append(f"broker={spec.broker}")
        phase("identity")
        first = link.call(" ".join(args), on_notice=_notice(lines, link.port))["result"]
        phase("config")
        if first.get("result") == WAITING:  # the slots do not hold the image: it comes as an install
            rec.uploaded = True
            lines.say(link.port, f"uploading {spec.bundle.name} ({spec.bundle.stat().st_size >> 20} MiB)")
            upload(link, spec.bundle, "", _upload_progress(lines, link.port))
            phase("image")
        after = link.call("provision-status")["result"]
        if not after.get("complete"):
            raise StationError(f"the device is not provisioned after the run (steps: {after.get('steps')})")
        if after.get("public_key_sha256") != rec.public_key_sha256:
            raise StationError("the device reported another key at the end than at the start")
        rec.image_version, rec.image_sha256 = after.get("bundle_version"), after.get("image_sha256")
        if rec.image_sha256 != manifest.images[0].sha256:
            raise StationError(f"the device holds image {clean(rec.image_sha256, 64)}, not the bundle's")
        rec.steps_run = list(first.get("steps_run") or [])
        rec.result = "provisioned"
        lines.say(link.port, f"provisioned {rec.device_id} with {rec.image_version} in {clock() - started:.1f} s")
    except (OtaError, KeyError, TypeError, ValueError, OSError) as e:
        rec.reason = clean(str(e) or type(e).__name__, REASON_LIMIT)
        lines.say(link.port, f"FAILED: {rec.reason}")
    finally:
        link.close()
    rec.duration_s = round(clock() - started, 3)
    rec.station_time = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return rec


def _upload_progress(lines: Lines, port: str) -> Callable[[int, int], None]:
    last = [-1]

    def progress(done: int, total: int) -> None:
        quarter = done * 4 // max(total, 1)
        if quarter > last[0]:
            last[0] = quarter
            lines.say(port, f"upload {quarter * 25}% ({done >> 20} of {total >> 20} MiB)")

    return progress


def _notice(lines: Lines, port: str) -> Callable[[dict[str, Any]], None]:
    seen: set[str] = set()

    def on(doc: dict[str, Any]) -> None:
        text = str(doc.get("progress") or doc.get("text") or "")
        phase = text.split(":")[0:2]
        key = ":".join(phase)
        if text and key not in seen:  # one line per step, not per progress tick
            seen.add(key)
            lines.say(port, clean(text, 200))

    return on


def run_station(spec: StationSpec, links: Sequence[Link], upload: Uploader, *,
                lines: Lines | None = None) -> list[DeviceRecord]:
    if spec.device_ids and len(spec.device_ids) != len(spec.ports):
        raise StationError(f"{len(spec.device_ids)} device ids for {len(spec.ports)} ports")
    manifest = bundle_manifest(spec.bundle)
    out = lines or Lines()
    log = FactoryLog(spec.log)
    try:
        def work(i: int) -> DeviceRecord:
            rec = provision_one(links[i], i, spec, manifest, upload=upload, lines=out)
            log.append(rec)
            return rec

        with ThreadPoolExecutor(max_workers=len(links), thread_name_prefix="station") as pool:
            return list(pool.map(work, range(len(links))))
    finally:
        log.close()


def summary(records: Sequence[DeviceRecord]) -> str:
    ok = [r for r in records if r.result == "provisioned"]
    lines = [f"provisioned {len(ok)} of {len(records)} device(s)"]
    lines += [f"  failed {r.port}: {r.reason}" for r in records if r.result != "provisioned"]
    return "\n".join(lines)
