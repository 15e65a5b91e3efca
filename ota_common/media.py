"""What a USB stick holds, as both sides see it: the layout convention (where
bundles go, where devices write their receipts) and the receipt schema.

The technician's tool (`ota-bundle usb`) lays sticks out and reads receipts;
the agent (`agent.media`) scans sticks and writes receipts. Both use these
names and this schema, so neither imports the other. Stdlib only.

Layout (docs/media.md):
  edge-ota/               bundles (`*.otab`), also in subdirectories up to MAX_DEPTH
  edge-ota/reports/       receipts devices write back: NAME.json and NAME.txt
  *.otab                  bundles at the top level are found too
Names are matched without regard to case (FAT keeps short names in capitals).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ota_common import strictjson
from ota_common.text import clean

TOP_DIR = "edge-ota"
REPORTS_DIR = "reports"  # inside TOP_DIR
BUNDLE_SUFFIX = ".otab"
SCHEMA = "edge-ota-media-receipt/1"

MAX_DEPTH = 3  # directory levels below the stick's root that are read (edge-ota/ is level 1)
MAX_ENTRIES = 4096  # directory entries looked at on one stick, in all
MAX_NAME = 255  # bytes of one file name
MAX_CANDIDATES = 32  # bundles whose signed head is read
MAX_RECEIPT = 64 << 10  # bytes of one receipt file
MAX_RECEIPTS = 1024  # receipt files `ota-bundle usb report` reads
MAX_IGNORED = 32  # ignored bundles a receipt lists
REASON_LIMIT = 300
NAME_LIMIT = 128

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Outcome(enum.StrEnum):
    """How a stick's visit ended: the receipt's `result`."""

    INSTALLED = "installed"
    NOTHING = "nothing-to-install"
    FAILED = "failed"


def is_bundle_name(name: str) -> bool:
    return name.lower().endswith(BUNDLE_SUFFIX) and not name.startswith(".")


def is_top_dir(name: str) -> bool:
    return name.lower() == TOP_DIR


def is_reports_dir(name: str) -> bool:
    return name.lower() == REPORTS_DIR


@dataclass(frozen=True, slots=True)
class Ignored:
    """A bundle on the stick that was not installed, and why."""

    file: str
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "file", clean(self.file, NAME_LIMIT * 2))
        object.__setattr__(self, "reason", clean(self.reason, REASON_LIMIT))


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a device writes back onto the stick (and queues for the fleet)."""

    device: str
    result: Outcome
    reason: str
    time: str  # YYYY-MM-DDTHH:MM:SSZ
    txn: str
    old_version: str | None = None
    new_version: str | None = None
    bundle: str | None = None  # the installed bundle's path on the stick
    slot: str | None = None
    ignored: tuple[Ignored, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("device", "time", "txn"):
            object.__setattr__(self, name, clean(getattr(self, name), NAME_LIMIT))
        object.__setattr__(self, "reason", clean(self.reason, REASON_LIMIT))
        for name in ("old_version", "new_version", "bundle", "slot"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, clean(value, NAME_LIMIT * 2))
        object.__setattr__(self, "ignored", tuple(self.ignored[:MAX_IGNORED]))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "device": self.device,
            "result": self.result.value,
            "reason": self.reason,
            "time": self.time,
            "txn": self.txn,
            "old_version": self.old_version,
            "new_version": self.new_version,
            "bundle": self.bundle,
            "slot": self.slot,
            "ignored": [{"file": i.file, "reason": i.reason} for i in self.ignored],
        }

    def encode(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()

    def text(self) -> str:
        """The short human form (the .txt file beside the JSON)."""
        lines = [
            f"edge-ota: {self.result.value}",
            f"device:      {self.device}",
            f"time:        {self.time}",
            f"old version: {self.old_version or '-'}",
            f"new version: {self.new_version or '-'}",
        ]
        if self.bundle:
            lines.append(f"bundle:      {self.bundle}")
        lines.append(f"reason:      {self.reason}")
        lines += [f"ignored:     {i.file}: {i.reason}" for i in self.ignored]
        return "\n".join(lines) + "\n"

    def file_stem(self) -> str:
        """NAME of NAME.json / NAME.txt: device, time and job id, safe on FAT."""
        when = self.time.replace("-", "").replace(":", "")
        return "-".join(_SAFE.sub("_", part)[:64] or "_" for part in (self.device, when, self.txn))

    @classmethod
    def decode(cls, raw: bytes) -> Receipt:
        """A receipt from a file on a stick (untrusted): ValueError says what is wrong."""
        if len(raw) > MAX_RECEIPT:
            raise ValueError(f"larger than {MAX_RECEIPT} bytes")
        try:
            doc = strictjson.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("not UTF-8") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ValueError(f"not an {SCHEMA} document")

        def text(key: str, optional: bool = False) -> Any:
            value = doc.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, str):
                raise ValueError(f"{key!r} is missing or not a string")
            return value

        try:
            result = Outcome(text("result"))
        except ValueError:
            raise ValueError(f"unknown result {clean(doc.get('result'), 40)!r}") from None
        raw_ignored = doc.get("ignored", [])
        if not isinstance(raw_ignored, list) or len(raw_ignored) > MAX_IGNORED:
            raise ValueError(f"'ignored' is not a list of at most {MAX_IGNORED} entries")
        ignored = []
        for item in raw_ignored:
            if not isinstance(item, dict) or not isinstance(item.get("file"), str) \
                    or not isinstance(item.get("reason"), str):
                raise ValueError("an 'ignored' entry is not {file, reason}")
            ignored.append(Ignored(item["file"], item["reason"]))
        return cls(
            device=text("device"), result=result, reason=text("reason"), time=text("time"), txn=text("txn"),
            old_version=text("old_version", True), new_version=text("new_version", True),
            bundle=text("bundle", True), slot=text("slot", True), ignored=tuple(ignored),
        )
