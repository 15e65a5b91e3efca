"""A real bundle, tampered with in every region: each change is rejected with
the specific error class, and no extent from a tampered region reaches the
slot. The signature is checked before the manifest is parsed; a payload hash
mismatch is raised before the payload is decompressed.

The bundle under test (built once by bundler.build) has five ops:
REPLACE, ZERO, REPLACE, ZERO, REPLACE - three small payload pieces.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from typing import Any

import pytest
import zstandard

from bundler.build import BundleSpec, build_full
from bundler.format.errors import (
    BoundsError,
    FormatError,
    HashMismatchError,
    OtaError,
    SignatureError,
    TruncatedError,
)
from bundler.format.header import HEADER_SIZE, Header
from bundler.format.manifest import ImageEntry
from bundler.format.ops import Op, OpType
from bundler.format.reader import BundleReader
from bundler.format.signing import Keyring, verify

from .conftest import ANY_DIGEST, KeyPair, SimSlot, assemble, manifest_for, stream_install

MiB = 1 << 20


def block_pattern(n: int, seed: int) -> bytes:
    block = random.Random(seed).randbytes(1024)
    return (block * (n // 1024 + 1))[:n]


@dataclass(frozen=True)
class Sample:
    data: bytes
    image: bytes
    header: Header
    ops: list[Op]
    keyring: Keyring

    @property
    def payload_ops(self) -> list[int]:
        return [i for i, op in enumerate(self.ops) if op.type is OpType.REPLACE]

    def piece(self, index: int) -> tuple[int, int]:
        """Absolute [start, end) of op `index`'s payload piece."""
        op = self.ops[index]
        start = self.header.payload_offset + op.payload_offset
        return start, start + op.payload_length

    def regions(self) -> dict[str, tuple[int, int]]:
        h = self.header
        return {
            "header": (0, HEADER_SIZE),
            "manifest": (h.manifest_offset, h.signature_offset),
            "signatures": (h.signature_offset, h.op_table_offset),
            "op table": (h.op_table_offset, h.payload_offset),
        }


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair) -> Sample:
    image = block_pattern(MiB, 1) + bytes(MiB) + block_pattern(MiB, 2) + bytes(MiB) + block_pattern(300_001, 3)
    tmp = tmp_path_factory.mktemp("tamper")
    (tmp / "image").write_bytes(image)
    spec = BundleSpec(tmp / "image", signing_key.private_path, "1.0", 1, "board", level=3, threads=1,
                      block_index=False)  # the five ops alone (the index: test_block_index.py)
    build_full(spec, tmp / "b.otab")
    data = (tmp / "b.otab").read_bytes()
    reader = BundleReader(io.BytesIO(data))
    verified = verify(reader.read_head(), signing_key.keyring)
    ops = reader.read_op_table(verified)
    assert [op.type for op in ops] == [OpType.REPLACE, OpType.ZERO, OpType.REPLACE, OpType.ZERO, OpType.REPLACE]
    return Sample(data, image, verified.header, ops, signing_key.keyring)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def rejected(sample: Sample, data: bytes, error: type[OtaError]) -> tuple[OtaError, SimSlot]:
    """Stream `data` into a fresh slot; assert it fails with exactly `error`, and
    that every extent that did reach the slot is the genuine one."""
    slot = SimSlot()
    with pytest.raises(OtaError) as excinfo:
        stream_install(data, sample.keyring, slot)
    assert type(excinfo.value) is error, f"{type(excinfo.value).__name__}: {excinfo.value}"
    assert bytes(slot.data) == sample.image[: len(slot.data)], "only genuine extents were written"
    return excinfo.value, slot


def test_untampered_sample_installs(sample: Sample) -> None:
    slot = SimSlot()
    stream_install(sample.data, sample.keyring, slot)
    assert bytes(slot.data) == sample.image
    assert slot.written == [0, 1, 2, 3, 4]


# --- header --------------------------------------------------------------------------

HEADER_FLIPS = [
    # offset, xor mask, error, BoundsError field or FormatError region, why
    (0, 0x01, FormatError, "header", "magic"),
    (7, 0x01, FormatError, "header", "magic"),
    (8, 0x01, FormatError, "header", "format version"),
    (9, 0x01, FormatError, "header", "format version"),
    (10, 0x01, FormatError, "header", "header length"),
    (12, 0x01, FormatError, "signatures", "manifest_length +-1 shifts the signature block"),
    (14, 0x10, BoundsError, "manifest_length", "manifest_length + 1 MiB"),
    (15, 0x01, BoundsError, "manifest_length", "manifest_length + 16 MiB"),
    (16, 0x01, FormatError, "signatures", "signature_length +-1"),
    (17, 0x01, FormatError, "signatures", "signature_length + 256: in bounds, wrong size for one signature"),
    (19, 0x01, BoundsError, "signature_length", "signature_length + 16 MiB"),
    (20, 0x01, SignatureError, "", "op_count changed within bounds: the header is signed"),
    (23, 0x01, BoundsError, "op_count", "op_count + 16 Mi"),
    (24, 0x01, SignatureError, "", "payload_length changed within bounds: the header is signed"),
    (30, 0x01, SignatureError, "", "payload_length + 2^48, still within bounds"),
    (31, 0x80, BoundsError, "payload_length", "payload_length >= 2^63"),
    (32, 0x01, FormatError, "header", "reserved"),
    (63, 0x80, FormatError, "header", "reserved"),
]


@pytest.mark.parametrize(
    ("offset", "mask", "error", "where", "_why"), HEADER_FLIPS, ids=[f"byte{f[0]}" for f in HEADER_FLIPS]
)
def test_flipped_header_byte_is_rejected_with_its_specific_error(
    sample: Sample, offset: int, mask: int, error: type[OtaError], where: str, _why: str
) -> None:
    exc, slot = rejected(sample, flip(sample.data, offset, mask), error)
    if isinstance(exc, BoundsError):
        assert exc.field == where
    elif isinstance(exc, FormatError):
        assert exc.region == where
    assert slot.written == []


def test_header_length_fields_that_grow_past_the_file_are_truncation(sample: Sample) -> None:
    # manifest_length + 8 KiB stays within the bound but runs past this small file
    assert len(sample.data) < 8192
    exc, slot = rejected(sample, flip(sample.data, 13, 0x20), TruncatedError)
    assert isinstance(exc, TruncatedError)
    assert exc.region in {"manifest", "signatures"}
    assert slot.written == []


# --- manifest and signature block -----------------------------------------------------


def test_any_manifest_change_is_a_signature_error_not_a_parse_error(sample: Sample) -> None:
    start, end = sample.regions()["manifest"]
    # byte 0 is '{': flipping it makes the manifest invalid JSON, yet the error is
    # the signature's, because the manifest is never parsed before verification
    for offset in (start, start + 1, (start + end) // 2, end - 1):
        exc, slot = rejected(sample, flip(sample.data, offset), SignatureError)
        assert "does not match" in str(exc)
        assert slot.written == []


@pytest.mark.parametrize(
    ("relative", "error", "message"),
    [
        (0, FormatError, "signature count 0"),  # count 1 -> 0
        (1, FormatError, "signature count 257"),  # count 1 -> 257
        (2, SignatureError, "does not match"),  # algorithm 1 -> 0: entry skipped
        (3, FormatError, "reserved bytes"),
        (5, FormatError, "reserved bytes"),
        (6, SignatureError, "none of which is in the keyring"),  # key id
        (37, SignatureError, "none of which is in the keyring"),
        (38, SignatureError, "does not match"),  # signature bytes
        (101, SignatureError, "does not match"),
    ],
)
def test_flipped_signature_block_byte(sample: Sample, relative: int, error: type[OtaError], message: str) -> None:
    exc, slot = rejected(sample, flip(sample.data, sample.header.signature_offset + relative), error)
    assert message in str(exc)
    if isinstance(exc, FormatError):
        assert exc.region == "signatures"
    assert slot.written == []


# --- op table -----------------------------------------------------------------------------


def test_any_op_table_change_is_an_op_table_hash_mismatch(sample: Sample) -> None:
    start, end = sample.regions()["op table"]
    for offset in range(start, end, 7):
        exc, slot = rejected(sample, flip(sample.data, offset), HashMismatchError)
        assert isinstance(exc, HashMismatchError)
        assert (exc.what, exc.op_index) == ("op table", None)
        assert slot.written == []


def test_every_byte_of_the_head_is_covered(sample: Sample) -> None:
    """Exhaustive: a flip anywhere before the payload is rejected with an error
    allowed for its region, and nothing is written."""
    allowed = {
        "header": (FormatError, TruncatedError, BoundsError, SignatureError),
        "manifest": (SignatureError,),
        "signatures": (FormatError, SignatureError),
        "op table": (HashMismatchError,),
    }
    for region, (start, end) in sample.regions().items():
        for offset in range(start, end):
            for mask in (0x01, 0x80):
                slot = SimSlot()
                with pytest.raises(OtaError) as excinfo:
                    stream_install(flip(sample.data, offset, mask), sample.keyring, slot)
                assert type(excinfo.value) in allowed[region], (region, offset, mask, excinfo.value)
                assert slot.written == [], (region, offset)


# --- payload -------------------------------------------------------------------------------


class DecoderSpy:
    """Records every buffer handed to zstd's frame parser or decoder, wherever in
    bundler.format the call comes from (the real decoder still does the work)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[bytes] = []
        real_params, real_decompressor = zstandard.get_frame_parameters, zstandard.ZstdDecompressor
        spy = self

        def get_frame_parameters(data: bytes, *args: Any, **kwargs: Any) -> Any:
            spy.seen.append(bytes(data))
            return real_params(data, *args, **kwargs)

        class Decompressor:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._real = real_decompressor(*args, **kwargs)

            def decompress(self, data: bytes, *args: Any, **kwargs: Any) -> Any:
                spy.seen.append(bytes(data))
                return self._real.decompress(data, *args, **kwargs)

        monkeypatch.setattr(zstandard, "get_frame_parameters", get_frame_parameters)
        monkeypatch.setattr(zstandard, "ZstdDecompressor", Decompressor)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("where", ["zstd magic", "first", "middle", "last"])
def test_flipped_payload_byte_fails_its_op_before_decompression(
    sample: Sample, which: int, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = sample.payload_ops[which]
    start, end = sample.piece(index)
    offset = {"zstd magic": start, "first": start + 4, "middle": (start + end) // 2, "last": end - 1}[where]
    tampered = flip(sample.data, offset)
    spy = DecoderSpy(monkeypatch)
    exc, slot = rejected(sample, tampered, HashMismatchError)
    assert tampered[start:end] not in spy.seen, "the tampered piece never reached the zstd decoder"
    earlier = [i for i in sample.payload_ops if i < index]
    assert len(spy.seen) == 2 * len(earlier), "only the genuine earlier pieces were parsed and decoded"
    assert isinstance(exc, HashMismatchError)
    assert (exc.what, exc.op_index) == ("payload", index)
    assert exc.expected == sample.ops[index].payload_sha256.hex()
    # ops before it were installed; the tampered op never reached the decompressor
    assert slot.written == list(range(index))
    assert index not in slot.produced


def test_swapped_payload_pieces_are_caught_at_the_first_one(sample: Sample) -> None:
    a, c = sample.payload_ops[0], sample.payload_ops[1]
    (a0, a1), (c0, c1) = sample.piece(a), sample.piece(c)
    swapped = sample.data[:a0] + sample.data[c0:c1] + sample.data[a1:c0] + sample.data[a0:a1] + sample.data[c1:]
    exc, slot = rejected(sample, swapped, HashMismatchError)
    assert isinstance(exc, HashMismatchError)
    assert exc.op_index == a
    assert slot.produced == []


def test_trailing_data_is_rejected_after_the_genuine_extents(sample: Sample) -> None:
    exc, slot = rejected(sample, sample.data + b"\x00", FormatError)
    assert isinstance(exc, FormatError)
    assert exc.region == "trailer"
    assert bytes(slot.data) == sample.image  # every extent was genuine; the caller must still fail


# --- truncation -----------------------------------------------------------------------------


def cut_points(sample: Sample) -> list[tuple[int, str]]:
    h = sample.header
    points = []
    for region, (start, end) in sample.regions().items():
        for cut in (start, start + 1, (start + end) // 2, end - 1):
            points.append((cut, region))
    for index in sample.payload_ops:
        start, end = sample.piece(index)
        for cut in (start, start + 1, (start + end) // 2, end - 1):
            points.append((cut, f"payload of op {index}"))
    assert h.total_length == len(sample.data)
    return points


def test_truncation_at_every_region_boundary_and_inside_each(sample: Sample) -> None:
    for cut, region in cut_points(sample):
        exc, slot = rejected(sample, sample.data[:cut], TruncatedError)
        assert isinstance(exc, TruncatedError)
        assert exc.region == region, (cut, region, str(exc))
        assert exc.got < exc.expected
        if region.startswith("payload of op "):
            index = int(region.rsplit(" ", 1)[1])
            assert slot.written == list(range(index))
        else:
            assert slot.written == []


def test_truncation_anywhere_in_the_head_is_truncation(sample: Sample) -> None:
    for cut in range(sample.header.payload_offset):
        slot = SimSlot()
        with pytest.raises(TruncatedError):
            stream_install(sample.data[:cut], sample.keyring, slot)
        assert slot.written == []


# --- validly signed, but malformed --------------------------------------------------------------


def test_signed_manifest_disagreeing_with_header_op_count(signing_key: KeyPair) -> None:
    ops = [Op(OpType.ZERO, 0, 10), Op(OpType.ZERO, 10, 10)]
    manifest = manifest_for(ops, 0, op_count=1, images=(ImageEntry("rootfs", 20, ANY_DIGEST, 0, 1),))
    data = assemble(manifest, ops, b"", [signing_key.key])
    head = BundleReader(io.BytesIO(data)).read_head()
    with pytest.raises(FormatError, match="header says 2 ops, manifest 1") as excinfo:
        verify(head, signing_key.keyring)
    assert excinfo.value.region == "manifest"


def test_signed_manifest_disagreeing_with_header_payload_length(signing_key: KeyPair) -> None:
    ops = [Op(OpType.ZERO, 0, 10)]
    manifest = manifest_for(ops, 0)
    header = Header(len(manifest.encode()), 102, 1, 5)
    data = assemble(manifest, ops, bytes(5), [signing_key.key], header=header)
    head = BundleReader(io.BytesIO(data)).read_head()
    with pytest.raises(FormatError, match="payload of 5 bytes, manifest 0"):
        verify(head, signing_key.keyring)


def test_signed_manifest_referencing_ops_beyond_the_table(signing_key: KeyPair) -> None:
    ops = [Op(OpType.ZERO, 0, 10)]
    manifest = manifest_for(ops, 0, images=(ImageEntry("rootfs", 10, ANY_DIGEST, 0, 2),))
    head = BundleReader(io.BytesIO(assemble(manifest, ops, b"", [signing_key.key]))).read_head()
    with pytest.raises(FormatError, match="beyond the op table"):
        verify(head, signing_key.keyring)


def test_signed_manifest_that_is_not_json_fails_after_the_signature(signing_key: KeyPair) -> None:
    ops = [Op(OpType.ZERO, 0, 10)]
    data = assemble(b"{not json", ops, b"", [signing_key.key])
    head = BundleReader(io.BytesIO(data)).read_head()
    with pytest.raises(FormatError, match="not valid UTF-8 JSON") as excinfo:
        verify(head, signing_key.keyring)
    assert excinfo.value.region == "manifest"


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([Op(OpType.ZERO, 0, 10), Op(OpType.ZERO, 11, 9)], "op 1: destination offset 11, expected 10"),
        ([Op(OpType.ZERO, 0, 10)], "ops cover 10 bytes of a 20-byte image"),
        ([Op(OpType.SOURCE_COPY, 0, 20, src_offset=0, src_length=20)], "SOURCE_COPY in an image without a base image"),
        ([Op(OpType.DELTA, 0, 20, 0, 5, b"\x01" * 32, b"\x01" * 32, 0, 20)], "DELTA in an image without a base image"),
    ],
)
def test_signed_op_table_with_bad_structure(signing_key: KeyPair, ops: list[Op], message: str) -> None:
    payload_length = sum(op.payload_length for op in ops)
    manifest = manifest_for(ops, payload_length, size=20)
    data = assemble(manifest, ops, bytes(payload_length), [signing_key.key])
    reader = BundleReader(io.BytesIO(data))
    verified = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(FormatError, match=message):
        reader.read_op_table(verified)


def test_signed_op_table_with_a_gap_in_the_payload(signing_key: KeyPair) -> None:
    h = hashlib.sha256(b"x").digest()
    ops = [Op(OpType.REPLACE, 0, 10, 0, 4, h, h), Op(OpType.REPLACE, 10, 10, 5, 4, h, h)]
    manifest = manifest_for(ops, 9)
    reader = BundleReader(io.BytesIO(assemble(manifest, ops, bytes(9), [signing_key.key])))
    verified = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(FormatError, match="op 1: payload offset 5, expected 4"):
        reader.read_op_table(verified)


def test_signed_op_record_with_reserved_bytes_set(signing_key: KeyPair) -> None:
    ops = [Op(OpType.ZERO, 0, 10)]
    manifest = manifest_for(ops, 0)
    data = bytearray(assemble(manifest, ops, b"", [signing_key.key]))
    table = Header.unpack(bytes(data[:HEADER_SIZE])).op_table_offset
    data[table + 1] = 1
    # the manifest pins the *original* table, so sign one that pins the altered record
    raw_table = bytes(data[table : table + 128])
    manifest = manifest_for(ops, 0, op_table_sha256=hashlib.sha256(raw_table).hexdigest())
    head = Header(len(manifest.encode()), 102, 1, 0)
    rebuilt = assemble(manifest, [], b"", [signing_key.key], header=head) + raw_table
    reader = BundleReader(io.BytesIO(rebuilt))
    verified = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(FormatError, match="op 0: reserved bytes are not zero") as excinfo:
        reader.read_op_table(verified)
    assert excinfo.value.region == "op table"
