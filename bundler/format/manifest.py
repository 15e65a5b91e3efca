"""The manifest: what a bundle claims, as canonical JSON.

Owns the manifest's fields, their validation, and the canonical encoding
(UTF-8, sorted keys, no insignificant whitespace) that the signature covers.
`Manifest` values come out of `parse()`; nothing here decides whether a device
should *trust* one — that is `signing.verify()`, which yields `VerifiedBundle`.

`parse()` runs in time linear in its input (at most MAX_MANIFEST bytes) and
every failure is a `FormatError`: numbers are bounded in length before Python
converts them (int() of a long digit string is quadratic and refuses more than
4300 digits), duplicate keys are found with a set, and times outside what
`datetime` can hold are refused instead of overflowing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bundler.format.errors import BoundsError, FormatError
from bundler.format.header import FORMAT_VERSION, MAX_MANIFEST, MAX_OPS, MAX_PAYLOAD

HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")  # \Z: "$" would accept a trailing newline
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}\Z")
NAME_RULE = "1-128 of A-Z a-z 0-9 . _ + : -"  # NAME in words, for error messages
MAX_IMAGES = 16
MAX_IMAGE_SIZE = 1 << 50
MAX_SECURITY_VERSION = (1 << 63) - 1
MAX_NUMBER_DIGITS = 20  # every integer field is below 2**64 (20 digits); longer literals are refused unread
MAX_TIME_LENGTH = 64  # writers use 20 characters (YYYY-MM-DDTHH:MM:SSZ); longer strings are refused unparsed


@dataclass(frozen=True, slots=True)
class ImageEntry:
    slot_class: str
    size: int
    sha256: str
    op_first: int
    op_count: int
    base_sha256: str | None = None
    base_size: int | None = None  # set exactly when base_sha256 is: the base image's size

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "slot_class": self.slot_class,
            "size": self.size,
            "sha256": self.sha256,
            "base_sha256": self.base_sha256,
            "op_first": self.op_first,
            "op_count": self.op_count,
        }
        if self.base_size is not None:
            doc["base_size"] = self.base_size
        return doc


@dataclass(frozen=True, slots=True)
class BlockIndexRef:
    """Where the block index (bundler.format.blockindex) is in the payload, and its SHA-256."""

    offset: int
    length: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "sha256": self.sha256}


MAX_EMBEDDED = 16  # embedded deltas one bundle carries at most (docs/bundle-format.md section 7.3)


@dataclass(frozen=True, slots=True)
class EmbeddedDeltaRef:
    """A delta of one full image against `base_sha256` carried in the payload of a full
    bundle (docs/bundle-format.md section 7.3): its op table (`table_count` records at
    payload offset `table_offset`, hashing to `table_sha256`) and its payload pieces (the
    `payload_length` bytes at `payload_offset`, hashing to `payload_sha256`); offsets
    relative to the payload region, the delta ops' own payload offsets relative to
    `payload_offset`."""

    slot_class: str
    base_sha256: str
    base_size: int
    table_offset: int
    table_count: int
    table_sha256: str
    payload_offset: int
    payload_length: int
    payload_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "slot_class": self.slot_class,
            "base_sha256": self.base_sha256,
            "base_size": self.base_size,
            "op_table": {"offset": self.table_offset, "count": self.table_count, "sha256": self.table_sha256},
            "payload": {"offset": self.payload_offset, "length": self.payload_length, "sha256": self.payload_sha256},
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    bundle_version: str
    security_version: int
    compatible: str
    created: datetime
    expires: datetime | None
    images: tuple[ImageEntry, ...]
    op_count: int
    op_table_sha256: str
    payload_length: int
    format_version: int = FORMAT_VERSION
    block_index: BlockIndexRef | None = None  # optional: per-block hashes for adaptive download
    embedded_deltas: tuple[EmbeddedDeltaRef, ...] = ()  # optional: deltas of full images for adaptive download

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format_version": self.format_version,
            "bundle_version": self.bundle_version,
            "security_version": self.security_version,
            "compatible": self.compatible,
            "created": format_time(self.created),
            "expires": format_time(self.expires) if self.expires else None,
            "images": [image.to_json() for image in self.images],
            "op_table": {"count": self.op_count, "sha256": self.op_table_sha256},
            "payload": {"length": self.payload_length},
        }
        if self.block_index is not None:
            doc["block_index"] = self.block_index.to_json()
        if self.embedded_deltas:
            doc["embedded_deltas"] = [e.to_json() for e in self.embedded_deltas]
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def format_time(t: datetime) -> str:
    u = t.astimezone(UTC)
    # Not strftime("%Y"): it drops the leading zeros of years before 1000 on glibc.
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}Z"


def parse_time(text: str, field: str) -> datetime:
    if len(text) > MAX_TIME_LENGTH:
        raise FormatError(f"{field}: a {len(text)}-character string is not an ISO 8601 time", region="manifest")
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise FormatError(f"{field}: {text!r} is not an ISO 8601 time", region="manifest") from None
    if t.tzinfo is None:
        raise FormatError(f"{field}: {text!r} has no time zone", region="manifest")
    try:
        return t.astimezone(UTC)
    except (OverflowError, ValueError):  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise FormatError(f"{field}: {text!r} is outside the years 1 to 9999 in UTC", region="manifest") from None


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise FormatError(f"integer literal of {len(text)} characters is out of range", region="manifest")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > MAX_NUMBER_DIGITS:
        raise FormatError(f"number literal of {len(text)} characters is out of range", region="manifest")
    return float(text)  # never valid in a manifest; kept so the error can name the key


def parse(raw: bytes) -> Manifest:
    """Decode and validate manifest bytes. Call only on bytes whose signature was checked."""
    if len(raw) > MAX_MANIFEST:
        raise BoundsError("manifest_length", len(raw), 2, MAX_MANIFEST, region="manifest")
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_bounded_int, parse_float=_bounded_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"not valid UTF-8 JSON: {e}", region="manifest") from None
    except RecursionError:
        raise FormatError("JSON nested too deeply", region="manifest") from None
    f = _Fields(doc, "manifest")
    version = f.integer("format_version", 1, 1 << 16)
    if version != FORMAT_VERSION:
        raise FormatError(f"format_version {version} is not {FORMAT_VERSION}", region="manifest")
    expires = f.opt_string("expires")
    images_raw = f.items("images", 1, MAX_IMAGES)
    op_table = _Fields(f.obj("op_table"), "manifest.op_table")
    payload = _Fields(f.obj("payload"), "manifest.payload")
    images = tuple(_image(_Fields(item, f"manifest.images[{i}]")) for i, item in enumerate(images_raw))
    block_index = None
    if "block_index" in f.doc:
        b = _Fields(f.obj("block_index"), "manifest.block_index")
        block_index = BlockIndexRef(b.integer("offset", 0, MAX_PAYLOAD), b.integer("length", 1, MAX_PAYLOAD),
                                    b.digest("sha256"))
    embedded: tuple[EmbeddedDeltaRef, ...] = ()
    if "embedded_deltas" in f.doc:
        embedded = tuple(_embedded(_Fields(item, f"manifest.embedded_deltas[{i}]"))
                         for i, item in enumerate(f.items("embedded_deltas", 1, MAX_EMBEDDED)))
    return Manifest(
        bundle_version=f.name("bundle_version"),
        security_version=f.integer("security_version", 0, MAX_SECURITY_VERSION),
        compatible=f.name("compatible"),
        created=parse_time(f.string("created"), "created"),
        expires=parse_time(expires, "expires") if expires is not None else None,
        images=images,
        op_count=op_table.integer("count", 1, MAX_OPS),
        op_table_sha256=op_table.digest("sha256"),
        payload_length=payload.integer("length", 0, MAX_PAYLOAD),
        format_version=version,
        block_index=block_index,
        embedded_deltas=embedded,
    )


def _embedded(f: _Fields) -> EmbeddedDeltaRef:
    table = _Fields(f.obj("op_table"), f"{f.where}.op_table")
    payload = _Fields(f.obj("payload"), f"{f.where}.payload")
    return EmbeddedDeltaRef(
        slot_class=f.name("slot_class"),
        base_sha256=f.digest("base_sha256"),
        base_size=f.integer("base_size", 1, MAX_IMAGE_SIZE),
        table_offset=table.integer("offset", 0, MAX_PAYLOAD),
        table_count=table.integer("count", 1, MAX_OPS),
        table_sha256=table.digest("sha256"),
        payload_offset=payload.integer("offset", 0, MAX_PAYLOAD),
        payload_length=payload.integer("length", 0, MAX_PAYLOAD),
        payload_sha256=payload.digest("sha256"),
    )


def _image(f: _Fields) -> ImageEntry:
    base = f.opt_string("base_sha256")
    if base is not None and not HEX64.match(base):
        raise FormatError(f"{f.where}.base_sha256 is not a SHA-256 hex digest", region="manifest")
    base_size = f.integer("base_size", 1, MAX_IMAGE_SIZE) if "base_size" in f.doc else None
    if (base is None) != (base_size is None):
        raise FormatError(f"{f.where}: base_sha256 and base_size come together", region="manifest")
    return ImageEntry(
        slot_class=f.name("slot_class"),
        size=f.integer("size", 1, MAX_IMAGE_SIZE),
        sha256=f.digest("sha256"),
        op_first=f.integer("op_first", 0, MAX_OPS),
        op_count=f.integer("op_count", 1, MAX_OPS),
        base_sha256=base,
        base_size=base_size,
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: refuse a key that appears twice. One pass over a set."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise FormatError(f"key {key!r} appears twice in one object", region="manifest")
            seen.add(key)
    return doc


KNOWN_KEYS = {
    "manifest": {
        "format_version", "bundle_version", "security_version", "compatible", "created", "expires",
        "images", "op_table", "payload", "block_index", "embedded_deltas",
    },
    "embedded": {"slot_class", "base_sha256", "base_size", "op_table", "payload"},
    "embedded.op_table": {"offset", "count", "sha256"},
    "embedded.payload": {"offset", "length", "sha256"},
    "manifest.block_index": {"offset", "length", "sha256"},
    "manifest.op_table": {"count", "sha256"},
    "manifest.payload": {"length"},
    "image": {"slot_class", "size", "sha256", "base_sha256", "base_size", "op_first", "op_count"},
}


def _kind(where: str) -> str:
    """The KNOWN_KEYS entry of an object: list items share one (manifest.images[3] -> image)."""
    if where.startswith("manifest.images["):
        return "image"
    if where.startswith("manifest.embedded_deltas["):
        return "embedded" + where.partition("]")[2]
    return where


class _Fields:
    """Typed access to one JSON object, with errors naming the exact key."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise FormatError(f"{where} is not an object", region="manifest")
        known = KNOWN_KEYS[_kind(where)]
        unknown = sorted(set(doc) - known)
        if unknown:
            raise FormatError(f"{where} has unknown key {unknown[0]!r}", region="manifest")
        self.doc: dict[str, Any] = doc
        self.where = where

    def _get(self, key: str) -> Any:
        if key not in self.doc:
            raise FormatError(f"{self.where}.{key} is missing", region="manifest")
        return self.doc[key]

    def _bad(self, key: str, what: str) -> FormatError:
        return FormatError(f"{self.where}.{key} {what}", region="manifest")

    def integer(self, key: str, low: int, high: int) -> int:
        v = self._get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self._bad(key, "is not an integer")
        if not low <= v <= high:
            raise self._bad(key, f"= {v} is outside [{low}, {high}]")
        return v

    def string(self, key: str) -> str:
        v = self._get(key)
        if not isinstance(v, str):
            raise self._bad(key, "is not a string")
        return v

    def opt_string(self, key: str) -> str | None:
        v = self.doc.get(key)
        if v is not None and not isinstance(v, str):
            raise self._bad(key, "is not a string or null")
        return v

    def name(self, key: str) -> str:
        v = self.string(key)
        if not NAME.match(v):
            raise self._bad(key, f"= {v!r} is not a name ({NAME_RULE})")
        return v

    def digest(self, key: str) -> str:
        v = self.string(key)
        if not HEX64.match(v):
            raise self._bad(key, "is not a lowercase SHA-256 hex digest")
        return v

    def items(self, key: str, low: int, high: int) -> list[Any]:
        v = self._get(key)
        if not isinstance(v, list):
            raise self._bad(key, "is not a list")
        if not low <= len(v) <= high:
            raise self._bad(key, f"has {len(v)} entries, allowed {low}..{high}")
        return v

    def obj(self, key: str) -> Any:
        return self._get(key)
