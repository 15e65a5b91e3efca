"""The format limits that bound install memory (docs/bundle-format.md section
9.1), held from the reader's side: what the old limits allowed is refused before
the reader allocates for it, the reader holds each region in one buffer and lets
go of a payload once it has been handed on, and `ota-bundle create` stays inside
every limit. The RSS of real installs of the worst legal bundles is measured in
tests/component/test_worst_case_memory.py."""

from __future__ import annotations

import hashlib
import io
import random
import re
import struct
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from bundler.format.errors import BoundsError, FormatError
from bundler.format.header import HEADER_SIZE, MAGIC, MAX_DELTA_OPS, MAX_MANIFEST, MAX_OPS, OP_RECORD_SIZE, Header
from bundler.format.manifest import ImageEntry
from bundler.format.ops import MAX_OP_DST, MAX_OP_PAYLOAD, MAX_WINDOW, Op, OpType, produce, unpack_table
from bundler.format.reader import READ_CHUNK, BundleReader
from bundler.format.signing import verify

from .conftest import KeyPair, MakeBundle, RecordingStream, assemble, manifest_for

MiB = 1 << 20
DOC = Path(__file__).parents[2] / "docs" / "bundle-format.md"


def replace_op(offset: int, data: bytes, frame: bytes, payload_offset: int = 0) -> Op:
    return Op(
        OpType.REPLACE,
        offset,
        len(data),
        payload_offset,
        len(frame),
        hashlib.sha256(frame).digest(),
        hashlib.sha256(data).digest(),
    )


# --- what the old limits allowed ------------------------------------------------------


def test_eight_mib_op_is_refused_before_its_payload_is_read(signing_key: KeyPair) -> None:
    ops = [Op(OpType.REPLACE, 0, 8 * MiB, 0, 1000, bytes(32), bytes(32))]
    data = assemble(manifest_for(ops, 1000), ops, bytes(1000), [signing_key.key])
    stream = RecordingStream(data)
    reader = BundleReader(stream)
    verified = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(BoundsError) as excinfo:
        reader.read_op_table(verified)
    assert (excinfo.value.field, excinfo.value.value) == ("dst_length", 8 * MiB)
    assert stream.requested == verified.header.payload_offset


@pytest.mark.parametrize("count", [MAX_DELTA_OPS + 1, MAX_OPS])
def test_delta_bundle_with_more_ops_than_a_device_holds_beside_its_dictionaries_is_refused_before_its_table(
    signing_key: KeyPair, count: int
) -> None:
    ops = [Op(OpType.ZERO, i, 1) for i in range(count)]
    image = ImageEntry("rootfs", count, "ab" * 32, 0, count, "cd" * 32, 4096)
    data = assemble(manifest_for(ops, 0, images=(image,)), ops, b"", [signing_key.key])
    stream = RecordingStream(data)
    reader = BundleReader(stream)
    verified = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(BoundsError, match=rf"op_count of a delta bundle={count} outside \[1, {MAX_DELTA_OPS}\]"):
        reader.read_op_table(verified)
    assert stream.requested == verified.header.op_table_offset  # not one byte of the table was read


def test_a_full_bundle_may_still_have_max_ops(signing_key: KeyPair) -> None:
    ops = [Op(OpType.ZERO, i, 1) for i in range(MAX_DELTA_OPS + 1)]
    data = assemble(manifest_for(ops, 0), ops, b"", [signing_key.key])
    reader = BundleReader(io.BytesIO(data))
    assert len(reader.read_op_table(verify(reader.read_head(), signing_key.keyring))) == MAX_DELTA_OPS + 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("op_count", 65536), ("manifest_length", 1 << 20), ("manifest_length", 900_000)],
)
def test_old_maxima_of_the_header_are_refused_before_the_region_is_read(field: str, value: int) -> None:
    lengths = {"manifest_length": 300, "signature_length": 102, "op_count": 1, field: value}
    header = struct.pack(  # by hand: Header.pack() refuses these values
        "<8sHHIIIQ32s", MAGIC, 1, HEADER_SIZE, lengths["manifest_length"], 102, lengths["op_count"], 0, bytes(32)
    )
    stream = RecordingStream(header + bytes(2 * MiB))
    with pytest.raises(BoundsError) as excinfo:
        BundleReader(stream).read_head()
    assert (excinfo.value.field, excinfo.value.value) == (field, value)
    assert stream.requests == [HEADER_SIZE]


def frame_without_content_size(data: bytes, window_log: int) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log, write_content_size=False)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("window_log", [27, MAX_WINDOW.bit_length() - 1, 10])
def test_frame_without_a_declared_content_size_is_refused_before_decoding(window_log: int) -> None:
    data = random.Random(window_log).randbytes(64 << 10)
    frame = frame_without_content_size(data, window_log)
    assert zstandard.get_frame_parameters(frame).content_size == zstandard.CONTENTSIZE_UNKNOWN
    tracemalloc.start()
    try:
        with pytest.raises(FormatError) as excinfo:
            produce(replace_op(0, data, frame), frame, 4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = "zstd window" if window_log > MAX_WINDOW.bit_length() - 1 else "does not declare its content size"
    assert expected in str(excinfo.value)
    assert "op 4" in str(excinfo.value)
    assert peak < len(data), "refused from the frame header, nothing decoded"


# --- what the reader holds ---------------------------------------------------------------


def maximal_payload_bundle(signing_key: KeyPair, count: int) -> tuple[bytes, list[bytes]]:
    """count REPLACE ops of MAX_OP_DST incompressible bytes, each frame as large as allowed."""
    ops, frames, images = [], [], []
    offset = payload = 0
    for seed in range(count):
        data = random.Random(seed).randbytes(MAX_OP_DST)
        frame = zstandard.ZstdCompressor(level=1).compress(data)
        assert len(frame) <= MAX_OP_PAYLOAD
        ops.append(replace_op(offset, data, frame, payload))
        frames.append(frame)
        images.append(data)
        offset += len(data)
        payload += len(frame)
    return assemble(manifest_for(ops, payload), ops, b"".join(frames), [signing_key.key]), images


def test_reader_holds_one_payload_at_a_time_in_a_single_buffer(signing_key: KeyPair) -> None:
    data, images = maximal_payload_bundle(signing_key, 3)
    reader = BundleReader(io.BytesIO(data))
    verified = verify(reader.read_head(), signing_key.keyring)
    ops = reader.read_op_table(verified)
    del data
    tracemalloc.start()
    try:
        seen = []
        for index, op, payload in reader.iter_payload(ops):
            assert payload is not None
            assert payload.readonly
            seen.append(hashlib.sha256(produce(op, payload, index)).digest())
            del payload  # a consumer that lets go: the reader must not keep it for the next read
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == [hashlib.sha256(image).digest() for image in images]
    # one payload being read + one read chunk + the extent of the op before (freed while reading)
    assert peak < MAX_OP_PAYLOAD + MAX_OP_DST + 2 * READ_CHUNK + (256 << 10)


def test_reader_reads_the_largest_op_table_into_one_buffer(signing_key: KeyPair) -> None:
    ops = [Op(OpType.ZERO, i, 1) for i in range(MAX_OPS)]
    data = assemble(manifest_for(ops, 0), ops, b"", [signing_key.key])
    reader = BundleReader(io.BytesIO(data))
    verified = verify(reader.read_head(), signing_key.keyring)
    tracemalloc.start()
    try:
        table = reader.read_op_table(verified)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = MAX_OPS * OP_RECORD_SIZE
    assert len(table) == MAX_OPS
    assert held < size + (64 << 10)
    assert peak < size + 2 * READ_CHUNK + (256 << 10)


# --- the builder stays inside ----------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 3, 19])
def test_ota_bundle_create_writes_ops_frames_and_windows_within_the_limits(make_bundle: MakeBundle, level: int) -> None:
    rng = random.Random(level)
    image = (
        rng.randbytes(9 * MiB + 5)
        + bytes(3 * MiB)
        + (rng.randbytes(4096) * 900)
        + rng.randbytes(MAX_OP_DST - 1)
        + bytes(MiB + 3)
    )
    raw = make_bundle(image, level=level).read_bytes()
    header = Header.unpack(raw[:HEADER_SIZE])
    ops = unpack_table(raw[header.op_table_offset : header.payload_offset])
    replace = [op for op in ops if op.type is OpType.REPLACE]
    assert len(replace) >= 4
    for op in replace:
        assert 1 <= op.dst_length <= MAX_OP_DST
        assert 1 <= op.payload_length <= MAX_OP_PAYLOAD
        start = header.payload_offset + op.payload_offset
        params = zstandard.get_frame_parameters(raw[start : start + op.payload_length])
        assert params.content_size == op.dst_length
        assert params.window_size <= MAX_WINDOW
        assert params.dict_id == 0


# --- the documented bound is the code's --------------------------------------------------------


def test_documented_memory_bound_matches_the_constants() -> None:
    text = DOC.read_text()
    block = re.search(r"<!-- memory-bound:begin -->\n(.*?)<!-- memory-bound:end -->", text, re.S)
    assert block, "docs/bundle-format.md keeps the bound's terms between the markers"
    terms = dict(re.findall(r"^\| `(\w+)` +\| ([\d,]+) +\|", block.group(1), re.M))
    as_int = {k: int(v.replace(",", "")) for k, v in terms.items()}
    assert as_int == {
        "D": MAX_OP_DST,
        "P": MAX_OP_PAYLOAD,
        "T": MAX_OPS * OP_RECORD_SIZE,
        "R": READ_CHUNK,
        "M": MAX_MANIFEST,
    }
