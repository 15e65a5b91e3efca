"""The provisioning record (`PROVISION_DIR/record.json`): which steps are done.

One JSON object, replaced atomically (`atomic_write`: temp file, fsync,
rename, fsync of the directory) after every step, so after a power cut it
names exactly the steps whose effects are durable; a re-run skips them and
continues with the first one missing. When the last step is recorded, the
record is the device's provisioning record: device id, public key
fingerprint, image version and hash, and when each step finished.

Read strictly (`ota_common.strictjson`), bounded; a record that does not parse
is an error naming the file, never silently "not provisioned": a device whose
record is damaged must not be provisioned over without --force.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import InstallError
from ota_common import strictjson
from ota_common.fsutil import atomic_write, make_dirs, read_regular
from ota_common.text import clean

RECORD_FILE = "record.json"
MAX_RECORD = 64 * 1024
STEPS = ("identity", "config", "image", "bootloader", "record")
FIELDS = ("device_id", "public_key_sha256", "key_type", "bundle_version", "image_sha256", "security_version",
          "device_config", "provisioned")


class RecordError(InstallError):
    """The provisioning record cannot be read or written."""


@dataclass(frozen=True, slots=True)
class Record:
    steps: dict[str, str] = field(default_factory=dict)  # step -> UTC time it was recorded
    info: dict[str, Any] = field(default_factory=dict)  # FIELDS
    runs: int = 0  # provisioning runs started (a re-run after a cut counts)
    forced: int = 0  # re-provisionings with --force

    @property
    def complete(self) -> bool:
        return all(s in self.steps for s in STEPS)

    def done(self, step: str) -> bool:
        return step in self.steps

    def with_step(self, step: str, time: str, **info: Any) -> Record:
        return replace(self, steps={**self.steps, step: time}, info={**self.info, **info})

    def restarted(self) -> Record:
        """A forced re-provisioning: every step runs again except the identity, which stays."""
        keep = {k: v for k, v in self.steps.items() if k == "identity"}
        return replace(self, steps=keep, forced=self.forced + 1)

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, **self.info, "runs": self.runs, "forced": self.forced,
                "complete": self.complete}


def path_of(directory: Path) -> Path:
    return directory / RECORD_FILE


def load(directory: Path) -> Record:
    path = path_of(directory)
    if not path.exists():
        return Record()
    try:
        raw = read_regular(path, MAX_RECORD + 1)
    except OSError as e:
        raise RecordError(f"cannot read the provisioning record {path}: {e.strerror}") from None
    try:
        if len(raw) > MAX_RECORD:
            raise ValueError(f"larger than {MAX_RECORD} bytes")
        doc = strictjson.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        steps = doc.get("steps", {})
        if not isinstance(steps, dict) or not all(k in STEPS and isinstance(v, str) for k, v in steps.items()):
            raise ValueError("steps is not an object of step names and times")
        info = {k: doc[k] for k in FIELDS if k in doc}
        runs, forced = doc.get("runs", 0), doc.get("forced", 0)
        if type(runs) is not int or type(forced) is not int:
            raise ValueError("runs and forced must be integers")
    except ValueError as e:
        raise RecordError(f"the provisioning record {path} is damaged ({clean(e, 120)}); "
                          "--force provisions again (the identity is kept)") from None
    return Record(steps=dict(steps), info=info, runs=runs, forced=forced)


def save(directory: Path, record: Record) -> None:
    data = json.dumps(record.to_json(), indent=2, sort_keys=True).encode() + b"\n"
    try:
        make_dirs(directory, 0o700)
        atomic_write(path_of(directory), data, mode=0o644)
    except OSError as e:
        raise RecordError(f"cannot write the provisioning record {path_of(directory)}: {e.strerror}") from None
