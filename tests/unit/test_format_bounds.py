"""Every length and count in the format at its bounds: the minimum and maximum
are accepted, one past either is rejected with an error naming the field, and
the rejection comes before the reader asks the stream for the bytes the field
claims (checked with a stream that records every request)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bundler.format.errors import BoundsError, FormatError
from bundler.format.header import (
    HEADER_SIZE,
    MAGIC,
    MAX_MANIFEST,
    MAX_PAYLOAD,
    MAX_SIGNATURE_BLOCK,
    OP_RECORD_SIZE,
    Header,
)
from bundler.format.manifest import MAX_IMAGE_SIZE, MAX_IMAGES, MAX_SECURITY_VERSION, parse
from bundler.format.ops import (
    MAX_OP_DST,
    MAX_OP_PAYLOAD,
    MAX_WINDOW,
    NO_HASH,
    Op,
    OpType,
    pack_table,
    produce,
    unpack_table,
    validate_image_ops,
)
from bundler.format.reader import READ_CHUNK, BundleReader
from bundler.format.signing import (
    MAX_KEY_FILE,
    MAX_KEYRING_FILES,
    MAX_SIGNATURES,
    KeyFileError,
    Keyring,
    Signature,
    pack_signatures,
    unpack_signatures,
    verify,
)

from .conftest import ANY_DIGEST, KeyPair, RecordingStream, assemble, manifest_for, new_key_pair

MAX_OP_COUNT = 1 << 15  # 4 MiB op table / 128-byte records
GiB = 1 << 30


def raw_header(
    manifest_length: int = 300,
    signature_length: int = 102,
    op_count: int = 1,
    payload_length: int = 0,
    *,
    magic: bytes = MAGIC,
    version: int = 1,
    header_length: int = HEADER_SIZE,
    reserved: bytes = bytes(32),
) -> bytes:
    """A header packed by hand, so it can hold values Header.pack refuses."""
    return struct.pack(
        "<8sHHIIIQ32s",
        magic,
        version,
        header_length,
        manifest_length,
        signature_length,
        op_count,
        payload_length,
        reserved,
    )


def header_with(field: str, value: int) -> bytes:
    lengths = {"manifest_length": 300, "signature_length": 102, "op_count": 1, "payload_length": 0}
    lengths[field] = value
    return raw_header(
        lengths["manifest_length"], lengths["signature_length"], lengths["op_count"], lengths["payload_length"]
    )


# --- header fields -------------------------------------------------------------

HEADER_FIELDS = [
    # field, minimum, maximum, largest value the field's width can hold
    ("manifest_length", 2, MAX_MANIFEST, 2**32 - 1),
    ("signature_length", 2, MAX_SIGNATURE_BLOCK, 2**32 - 1),
    ("op_count", 1, MAX_OP_COUNT, 2**32 - 1),
    ("payload_length", 0, MAX_PAYLOAD, 2**64 - 1),
]


@pytest.mark.parametrize(("field", "low", "high", "_width"), HEADER_FIELDS)
def test_header_accepts_each_length_at_its_minimum_and_maximum(field: str, low: int, high: int, _width: int) -> None:
    for value in (low, high):
        header = Header.unpack(header_with(field, value))
        assert getattr(header, field) == value
        assert Header.unpack(header.pack()) == header


@pytest.mark.parametrize(("field", "low", "high", "width"), HEADER_FIELDS)
def test_header_rejects_each_length_one_past_its_bounds_naming_the_field(
    field: str, low: int, high: int, width: int
) -> None:
    past = [v for v in (low - 1, high + 1, width) if 0 <= v <= width]
    assert past, "each field has at least one representable out-of-range value"
    for value in past:
        with pytest.raises(BoundsError) as excinfo:
            Header.unpack(header_with(field, value))
        assert excinfo.value.field == field
        assert excinfo.value.value == value
        assert field in str(excinfo.value)


def test_documented_maxima_are_the_codes() -> None:
    assert (MAX_MANIFEST, MAX_SIGNATURE_BLOCK, MAX_OP_COUNT) == (64 << 10, 1602, 32768)
    assert MAX_PAYLOAD == 2**63 - 1
    assert (MAX_OP_DST, MAX_OP_PAYLOAD, MAX_WINDOW) == (4 << 20, (4 << 20) + (16 << 10), 4 << 20)
    assert (MAX_IMAGES, MAX_IMAGE_SIZE, MAX_SECURITY_VERSION, MAX_SIGNATURES) == (16, 2**50, 2**63 - 1, 16)
    assert (MAX_KEY_FILE, MAX_KEYRING_FILES) == (16 * 1024, 256)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("manifest_length", MAX_MANIFEST + 1),
        ("manifest_length", 2**32 - 1),
        ("signature_length", MAX_SIGNATURE_BLOCK + 1),
        ("op_count", MAX_OP_COUNT + 1),
        ("payload_length", 2**64 - 1),
    ],
)
def test_oversized_length_is_rejected_before_anything_past_the_header_is_read(field: str, value: int) -> None:
    # a stream that could supply all the bytes asked for: only the reader's bound stops it
    stream = RecordingStream(header_with(field, value) + bytes(2 * MAX_MANIFEST))
    with pytest.raises(BoundsError) as excinfo:
        BundleReader(stream).read_head()
    assert excinfo.value.field == field
    assert stream.requests == [HEADER_SIZE]


def test_largest_accepted_head_is_read_in_bounded_chunks() -> None:
    stream = RecordingStream(raw_header(MAX_MANIFEST, MAX_SIGNATURE_BLOCK) + bytes(MAX_MANIFEST + MAX_SIGNATURE_BLOCK))
    head = BundleReader(stream).read_head()
    assert (len(head.manifest_bytes), len(head.signature_bytes)) == (MAX_MANIFEST, MAX_SIGNATURE_BLOCK)
    assert max(stream.requests) <= READ_CHUNK
    assert stream.requested == HEADER_SIZE + MAX_MANIFEST + MAX_SIGNATURE_BLOCK


def test_header_claiming_more_than_4_gib_of_payload_is_accepted() -> None:
    payload = 5 * GiB + 12345
    header = Header.unpack(raw_header(payload_length=payload, op_count=3))
    assert header.payload_length == payload
    assert header.total_length == HEADER_SIZE + 300 + 102 + 3 * OP_RECORD_SIZE + payload
    assert header.total_length > 2**32
    assert Header.unpack(header.pack()) == header


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magic": b"\x89OTAB\r\n\x00"}, "bad magic"),
        ({"version": 2}, "unsupported format version 2"),
        ({"header_length": 65}, "header length field is 65"),
        ({"reserved": bytes(31) + b"\x01"}, "reserved header bytes"),
    ],
)
def test_header_fixed_fields_must_match(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError, match=message) as excinfo:
        Header.unpack(raw_header(**kwargs))
    assert type(excinfo.value) is FormatError
    assert excinfo.value.region == "header"


def test_documented_header_example_matches_the_code() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "bundle-format.md").read_text()
    block = re.search(r"<!-- header-example:begin -->\n```\n(.*?)```\n<!-- header-example:end -->", doc, re.S)
    assert block, "docs/bundle-format.md keeps its worked header example between the markers"
    raw = bytes.fromhex("".join(line[10:] for line in block.group(1).splitlines()))
    header = Header.unpack(raw)
    assert (header.manifest_length, header.signature_length, header.op_count) == (583, 102, 1283)
    assert header.payload_length == 0x1_4B3C_2D10 == 5557202192
    assert (header.signature_offset, header.op_table_offset, header.payload_offset) == (647, 749, 164973)
    assert header.total_length == 5557367165
    assert header.pack() == raw


# --- signature block -------------------------------------------------------------


def signature_block(count: int) -> bytes:
    return pack_signatures([Signature(bytes([i]) * 32, bytes(64)) for i in range(count)])


@pytest.mark.parametrize("count", [1, MAX_SIGNATURES])
def test_signature_block_accepts_count_at_bounds(count: int) -> None:
    block = signature_block(count)
    assert len(block) == 2 + 100 * count
    assert len(unpack_signatures(block)) == count


@pytest.mark.parametrize("count", [0, MAX_SIGNATURES + 1, 0xFFFF])
def test_signature_block_rejects_count_out_of_bounds(count: int) -> None:
    block = struct.pack("<H", count) + signature_block(1)[2:]
    with pytest.raises(FormatError, match=f"signature count {count} outside") as excinfo:
        unpack_signatures(block)
    assert excinfo.value.region == "signatures"


@pytest.mark.parametrize("delta", [-1, 1])
def test_signature_block_length_must_be_exact(delta: int) -> None:
    block = signature_block(2)
    block = block[:delta] if delta < 0 else block + b"\x00"
    with pytest.raises(FormatError, match="2 signatures need 202"):
        unpack_signatures(block)


def test_bundle_with_16_signatures_is_accepted_and_17_rejected(tmp_path: Path) -> None:
    pairs = [new_key_pair(tmp_path / f"k{i}") for i in range(MAX_SIGNATURES + 1)]
    ops = [Op(OpType.ZERO, 0, 4096)]
    manifest = manifest_for(ops, 0)
    sixteen = assemble(manifest, ops, b"", [p.key for p in pairs[:16]])
    head = BundleReader(io.BytesIO(sixteen)).read_head()
    assert verify(head, pairs[15].keyring).signer == pairs[15].key_id
    with pytest.raises(BoundsError, match="signature_length=1702"):
        assemble(manifest, ops, b"", [p.key for p in pairs])


# --- manifest fields ---------------------------------------------------------------


def valid_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(manifest_for([Op(OpType.ZERO, 0, 4096)], 0).encode())
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def image_doc(size: int = 4096) -> dict[str, Any]:
    return {"base_sha256": None, "op_count": 1, "op_first": 0, "sha256": ANY_DIGEST, "size": size, "slot_class": "r"}


MANIFEST_BOUNDS: list[tuple[str, Any, Any, list[Any]]] = [
    # name in the error, setter, accepted values, rejected values
    (
        "security_version",
        lambda d, v: d.__setitem__("security_version", v),
        [0, MAX_SECURITY_VERSION],
        [-1, MAX_SECURITY_VERSION + 1, True, 1.0],
    ),
    (
        "images[0].size",
        lambda d, v: d["images"][0].__setitem__("size", v),
        [1, MAX_IMAGE_SIZE],
        [0, MAX_IMAGE_SIZE + 1],
    ),
    (
        "images",
        lambda d, v: d.__setitem__("images", [image_doc() for _ in range(v)]),
        [1, MAX_IMAGES],
        [0, MAX_IMAGES + 1],
    ),
    ("op_table.count", lambda d, v: d["op_table"].__setitem__("count", v), [1, 1 << 15], [0, (1 << 15) + 1]),
    ("payload.length", lambda d, v: d["payload"].__setitem__("length", v), [0, MAX_PAYLOAD], [-1, MAX_PAYLOAD + 1]),
    ("format_version", lambda d, v: d.__setitem__("format_version", v), [1], [0, 2]),
    (
        "compatible",
        lambda d, v: d.__setitem__("compatible", v),
        ["a", "A" * 128, "x.y_z+1:2-3"],
        ["", "A" * 129, "-lead", "board\n", "sp ace", "é"],
    ),
    ("bundle_version", lambda d, v: d.__setitem__("bundle_version", v), ["1"], ["1.0\n", 1]),
    (
        "images[0].sha256",
        lambda d, v: d["images"][0].__setitem__("sha256", v),
        ["0" * 64],
        ["A" * 64, "0" * 63, "0" * 64 + "\n"],
    ),
    (
        "images[0].base_sha256",
        lambda d, v: d["images"][0].update(base_sha256=v, base_size=1),
        ["f" * 64],
        ["F" * 64, 5],
    ),
    (
        "images[0].base_size",
        lambda d, v: d["images"][0].update(base_sha256="f" * 64, base_size=v),
        [1, MAX_IMAGE_SIZE],
        [0, MAX_IMAGE_SIZE + 1, "1"],
    ),
    (
        "images[0]: base_sha256 and base_size come together",
        lambda d, v: d["images"][0].update(v),
        [{"base_sha256": None}],
        [{"base_sha256": "f" * 64}, {"base_sha256": None, "base_size": 5}],
    ),
]


@pytest.mark.parametrize(("name", "setter", "good", "bad"), MANIFEST_BOUNDS, ids=[b[0] for b in MANIFEST_BOUNDS])
def test_manifest_field_bounds(name: str, setter: Any, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        doc = valid_doc()
        setter(doc, value)
        parse(encode(doc))
    for value in bad:
        doc = valid_doc()
        setter(doc, value)
        with pytest.raises(FormatError) as excinfo:
            parse(encode(doc))
        assert type(excinfo.value) is FormatError
        assert excinfo.value.region == "manifest"
        assert f"manifest.{name}" in str(excinfo.value) or name in str(excinfo.value), (value, str(excinfo.value))


def test_manifest_times_need_a_zone() -> None:
    doc = valid_doc()
    doc["created"] = "2026-01-01T00:00:00"
    with pytest.raises(FormatError, match=r"created.*no time zone"):
        parse(encode(doc))
    doc["created"] = "2026-01-01T00:00:00Z"
    doc["expires"] = "yesterday"
    with pytest.raises(FormatError, match=r"expires.*not an ISO 8601 time"):
        parse(encode(doc))


@pytest.mark.parametrize("raw", [b"", b"[]", b"\xff{}", b'{"format_version":1', b"null"])
def test_manifest_that_is_not_a_json_object_is_a_format_error(raw: bytes) -> None:
    with pytest.raises(FormatError) as excinfo:
        parse(raw)
    assert excinfo.value.region == "manifest"


def test_manifest_image_size_above_4_gib_parses() -> None:
    doc = valid_doc()
    doc["images"][0]["size"] = 6 * GiB + 3
    assert parse(encode(doc)).images[0].size == 6 * GiB + 3


# --- op records ---------------------------------------------------------------------

H = hashlib.sha256(b"x").digest()


def replace(offset: int, length: int, payload_offset: int, payload_length: int) -> Op:
    return Op(OpType.REPLACE, offset, length, payload_offset, payload_length, H, H)


def test_replace_op_at_maximum_sizes_is_accepted() -> None:
    ops = [replace(0, MAX_OP_DST, 0, MAX_OP_PAYLOAD)]
    assert validate_image_ops(ops, 0, MAX_OP_DST, 0) == MAX_OP_PAYLOAD


def test_replace_op_at_minimum_sizes_is_accepted() -> None:
    assert validate_image_ops([replace(0, 1, 0, 1)], 0, 1, 0) == 1


@pytest.mark.parametrize(
    ("dst_length", "payload_length", "image_rest", "field"),
    [
        (MAX_OP_DST + 1, 100, MAX_OP_DST + 1, "dst_length"),
        (0, 100, 100, "dst_length"),
        (4097, 100, 4096, "dst_length"),  # runs past the end of the image
        (4096, MAX_OP_PAYLOAD + 1, 4096, "payload_length"),
        (4096, 0, 4096, "payload_length"),
    ],
)
def test_op_length_out_of_bounds_names_the_field_and_the_op(
    dst_length: int, payload_length: int, image_rest: int, field: str
) -> None:
    ops = [Op(OpType.ZERO, 0, 10), replace(10, dst_length, 0, payload_length)]
    with pytest.raises(BoundsError) as excinfo:
        validate_image_ops(ops, 0, 10 + image_rest, 0)
    assert excinfo.value.field == field
    assert excinfo.value.region == "op 1"


def test_zero_op_of_length_zero_is_rejected() -> None:
    with pytest.raises(BoundsError) as excinfo:
        validate_image_ops([Op(OpType.ZERO, 0, 0)], 5, 4096, 0)
    assert (excinfo.value.field, excinfo.value.region) == ("dst_length", "op 5")


def test_zero_op_has_no_size_cap_but_the_image() -> None:
    size = 6 * GiB
    assert validate_image_ops([Op(OpType.ZERO, 0, size)], 0, size, 0) == 0


def test_image_larger_than_4_gib_in_the_op_table() -> None:
    four = 4 * GiB
    ops = [
        Op(OpType.ZERO, 0, four),
        replace(four, MAX_OP_DST, 0, 1000),
        replace(four + MAX_OP_DST, 5, 1000, 7),
        Op(OpType.ZERO, four + MAX_OP_DST + 5, 2 * GiB - 2),
    ]
    size = 6 * GiB + MAX_OP_DST + 3
    assert validate_image_ops(ops, 0, size, 0) == 1007
    again = unpack_table(pack_table(ops))
    assert again == ops
    assert again[2].dst_offset == four + MAX_OP_DST > 2**32
    manifest = manifest_for(ops, 1007, size=size)
    assert parse(manifest.encode()).images[0].size == size


def test_signed_bundle_of_a_5_gib_image_streams_without_payload_reads(signing_key: KeyPair) -> None:
    size = 5 * GiB + 1
    ops = [Op(OpType.ZERO, 0, size)]
    data = assemble(manifest_for(ops, 0, size=size), ops, b"", [signing_key.key])
    stream = RecordingStream(data)
    reader = BundleReader(stream)
    verified = verify(reader.read_head(), signing_key.keyring)
    assert verified.manifest.images[0].size == size
    table = reader.read_op_table(verified)
    assert [(i, op.dst_length, p) for i, op, p in reader.iter_payload(table)] == [(0, size, None)]
    assert stream.requested == len(data) + 1  # the +1 is the end-of-stream probe


def test_oversized_op_payload_is_rejected_before_any_payload_byte_is_read(signing_key: KeyPair) -> None:
    ops = [replace(0, 4096, 0, MAX_OP_PAYLOAD + 1)]
    data = assemble(manifest_for(ops, MAX_OP_PAYLOAD + 1), ops, b"", [signing_key.key])
    stream = RecordingStream(data + bytes(1 << 20))
    reader = BundleReader(stream)
    verified = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(BoundsError) as excinfo:
        reader.read_op_table(verified)
    assert excinfo.value.field == "payload_length"
    assert stream.requested == verified.header.payload_offset


# --- zstd frames ---------------------------------------------------------------------------


def frame_with_window(window_log: int, data: bytes) -> bytes:
    """A frame of `data` whose header names a 2**window_log window and declares
    the content size (libzstd shrinks the window to the input, so write it here)."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log, write_content_size=False)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = compressor.compress(data) + compressor.flush()
    assert frame[4] == 0, "no content size field, no checksum, no dictionary"
    return frame[:4] + bytes([0xC0, (window_log - 10) << 3]) + len(data).to_bytes(8, "little") + frame[6:]


def op_for(data: bytes, frame: bytes) -> Op:
    return Op(
        OpType.REPLACE, 0, len(data), 0, len(frame), hashlib.sha256(frame).digest(), hashlib.sha256(data).digest()
    )


def test_zstd_window_at_the_maximum_is_accepted() -> None:
    data = bytes(range(256)) * 16
    frame = frame_with_window(MAX_WINDOW.bit_length() - 1, data)
    assert zstandard.get_frame_parameters(frame).window_size == MAX_WINDOW
    assert produce(op_for(data, frame), frame, 0) == data


def test_zstd_window_past_the_maximum_is_rejected() -> None:
    data = bytes(range(256)) * 16
    frame = frame_with_window(MAX_WINDOW.bit_length(), data)
    with pytest.raises(BoundsError) as excinfo:
        produce(op_for(data, frame), frame, 3)
    assert excinfo.value.field == "zstd window"
    assert excinfo.value.region == "op 3"


def forge_content_size(frame: bytes, claimed: int) -> bytes:
    """Rewrite a frame's header to declare `claimed` content bytes: single-segment
    with a 4-byte size field when that fits the window bound, otherwise a 1 KiB
    window and an 8-byte size field."""
    body = frame[zstandard.frame_header_size(frame) :]
    if claimed <= MAX_WINDOW:
        return frame[:4] + bytes([0xA0]) + claimed.to_bytes(4, "little") + body
    return frame[:4] + bytes([0xC0, 0x00]) + claimed.to_bytes(8, "little") + body


@pytest.mark.parametrize("claimed", [100 << 20, 1 << 40])
def test_declared_content_size_is_checked_before_decoding_allocates_it(claimed: int) -> None:
    data = bytes(range(256)) * 16
    forged = forge_content_size(zstandard.ZstdCompressor(level=3).compress(data), claimed)
    params = zstandard.get_frame_parameters(forged)
    assert params.content_size == claimed
    assert params.window_size <= MAX_WINDOW, "only the content size is out of line"
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=f"declares {claimed} bytes"):
            produce(op_for(data, forged), forged, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_payload_that_is_not_one_zstd_frame_is_a_format_error() -> None:
    data = b"hello" * 100
    frame = zstandard.ZstdCompressor().compress(data)
    for bad in (b"garbage!", frame + b"\x00", frame[:-1]):
        with pytest.raises(FormatError) as excinfo:
            produce(op_for(data, bad), bad, 2)
        assert excinfo.value.region == "payload"


# --- keyrings ----------------------------------------------------------------------


def test_key_file_larger_than_the_bound_is_not_parsed(tmp_path: Path) -> None:
    big = tmp_path / "big.pub"
    big.write_bytes(b"x" * (MAX_KEY_FILE + 1))
    with pytest.raises(KeyFileError, match="larger than"):
        Keyring.load(big)


def test_keyring_directory_holds_at_most_256_keys(tmp_path: Path, signing_key: KeyPair) -> None:
    pem = signing_key.public_path.read_bytes()
    for i in range(MAX_KEYRING_FILES):
        (tmp_path / f"{i:03}.pub").write_bytes(pem)
    assert list(Keyring.load(tmp_path).keys) == [signing_key.key_id]
    (tmp_path / "extra.pub").write_bytes(pem)
    with pytest.raises(KeyFileError, match="more than 256"):
        Keyring.load(tmp_path)


def test_zero_op_must_not_carry_payload() -> None:
    with pytest.raises(FormatError, match="ZERO op carries payload"):
        validate_image_ops([Op(OpType.ZERO, 0, 10, 0, 1)], 0, 10, 0)
    with pytest.raises(FormatError, match="ZERO op carries payload"):
        validate_image_ops([Op(OpType.ZERO, 0, 10, payload_sha256=H)], 0, 10, 0)
    assert validate_image_ops([Op(OpType.ZERO, 0, 10, dst_sha256=NO_HASH)], 0, 10, 0) == 0
