"""Embedded deltas: deltas of a full image carried inside the same full bundle
(docs/bundle-format.md section 7.3), so a device that installs it by HTTP range
requests and runs one of their bases fetches only that delta.

Owns the rules of the sections in the payload region (where each embedded
delta's op table and payload must be, checked with the op table at step 6),
the check of one embedded op table once fetched (its pinned SHA-256, then the
structure of a delta image's ops against the base named in the manifest), and
moving its ops' payload offsets from its own payload section to the payload
region, so they can stand in for the full image's ops. The manifest entry is
`manifest.EmbeddedDeltaRef`; reading and using the sections is the reader's
and the device's.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from bundler.format.errors import BoundsError, FormatError, HashMismatchError
from bundler.format.header import MAX_DELTA_OPS, OP_RECORD_SIZE
from bundler.format.manifest import EmbeddedDeltaRef, ImageEntry
from bundler.format.ops import OpTable, OpType, unpack_table, validate_image_ops

# Records a device holds for the embedded deltas it runs (one per image: the largest of each
# slot class, together). A delta's table is held through the payload phase next to the worst
# DELTA ops; at MAX_OPS records that peaked at 66 MiB RSS, at this bound at 63 (section 9.1).
MAX_EMBEDDED_OPS = MAX_DELTA_OPS
_PAYLOAD_OFFSET = struct.Struct("<Q")  # the record's payload_offset field
_PAYLOAD_OFFSET_AT = 40
_WITH_PAYLOAD = frozenset({OpType.REPLACE, OpType.DELTA})


def table_length(ref: EmbeddedDeltaRef) -> int:
    return ref.table_count * OP_RECORD_SIZE


def image_of(images: Sequence[ImageEntry], ref: EmbeddedDeltaRef) -> ImageEntry | None:
    return next((im for im in images if im.slot_class == ref.slot_class), None)


def check_sections(images: Sequence[ImageEntry], refs: Sequence[EmbeddedDeltaRef], cursor: int,
                   payload_length: int) -> int:
    """Check the manifest's embedded deltas against the images and the payload region:
    each is for a full image of the bundle, no two for the same image and base, their
    op tables and payloads follow each other in manifest order from `cursor` (where the
    op payloads and the block index end) with no gap or overlap, inside the payload,
    and the largest of each slot class have at most MAX_EMBEDDED_OPS ops together (what
    a device may hold). Returns the payload offset after them."""
    seen: dict[tuple[str, str], int] = {}
    largest: dict[str, int] = {}
    for ref in refs:
        largest[ref.slot_class] = max(largest.get(ref.slot_class, 0), ref.table_count)
    ops = sum(largest.values())
    if ops > MAX_EMBEDDED_OPS:
        raise BoundsError("embedded delta ops", ops, 1, MAX_EMBEDDED_OPS, region="manifest")
    for i, ref in enumerate(refs):
        what = f"embedded delta {i}"
        image = image_of(images, ref)
        if image is None:
            raise FormatError(f"{what} is for slot class {ref.slot_class!r}, which has no image in this bundle",
                              region="manifest")
        if image.base_sha256 is not None:
            raise FormatError(f"{what}: image {ref.slot_class} is itself a delta; only a full image carries "
                              "embedded deltas", region="manifest")
        key = (ref.slot_class, ref.base_sha256)
        if key in seen:
            raise FormatError(f"embedded deltas {seen[key]} and {i} both apply to {ref.slot_class} base "
                              f"{ref.base_sha256[:16]}", region="manifest")
        seen[key] = i
        _placed(f"{what} op table", ref.table_offset, cursor)
        cursor = ref.table_offset + table_length(ref)
        _placed(f"{what} payload", ref.payload_offset, cursor)
        cursor = ref.payload_offset + ref.payload_length
        if cursor > payload_length:
            raise FormatError(f"{what} ends at payload offset {cursor}, past the end of the payload "
                              f"({payload_length} bytes): outside the bundle", region="manifest")
    return cursor


def _placed(what: str, offset: int, cursor: int) -> None:
    if offset < cursor:
        raise FormatError(f"{what} at payload offset {offset} overlaps the section before it, which ends at "
                          f"{cursor}", region="manifest")
    if offset > cursor:
        raise FormatError(f"{what} at payload offset {offset} leaves a gap after the section before it, which "
                          f"ends at {cursor}", region="manifest")


def load_table(raw: bytes | bytearray | memoryview, ref: EmbeddedDeltaRef, index: int, image: ImageEntry) -> OpTable:
    """An embedded delta's op table as fetched: its SHA-256 equals the manifest's, its
    ops make a delta image of `image` against the named base (section 6.3, payload
    offsets from 0 within its payload section, which they fill exactly)."""
    actual = hashlib.sha256(raw).hexdigest()
    if actual != ref.table_sha256:
        raise HashMismatchError(f"embedded delta {index} op table", ref.table_sha256, actual)
    if len(raw) != table_length(ref):
        raise FormatError(f"embedded delta {index} op table is {len(raw)} bytes, not {table_length(ref)}",
                          region="op table")
    ops = unpack_table(raw)
    try:
        end = validate_image_ops(ops, 0, image.size, 0, ref.base_size)
    except FormatError as e:
        detail = str(e).removeprefix(f"{e.region}: ")
        raise FormatError(f"embedded delta {index}: {detail}", region="op table") from None
    if end != ref.payload_length:
        raise FormatError(f"embedded delta {index}: its ops reference {end} payload bytes, the manifest says "
                          f"{ref.payload_length}", region="op table")
    return ops


def rebase(buf: bytearray | memoryview, ops: OpTable, shift: int) -> None:
    """Move every payload offset of `ops`, whose records are `buf`, by `shift` (from the
    embedded delta's payload section to the payload region), in place."""
    for k, op in enumerate(ops):
        if op.type in _WITH_PAYLOAD:
            _PAYLOAD_OFFSET.pack_into(buf, k * OP_RECORD_SIZE + _PAYLOAD_OFFSET_AT, op.payload_offset + shift)
