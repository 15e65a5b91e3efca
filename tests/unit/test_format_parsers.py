"""Every parser of untrusted bytes in bundler/format runs in linear time and
fails with a FormatError (or its specific subclass, or KeyFileError for key
files) carrying one clear line: the manifest (duplicate keys, numbers too long
for Python's int(), times outside what datetime holds), the signature block, the
op table, zstd frame headers, and PEM key files.

Linearity is shown without timing: the duplicate-key hook is driven with keys
that count their comparisons and give up past a linear budget, and the largest
inputs the format allows are parsed as part of the normal run.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bundler.format import manifest as manifest_mod
from bundler.format.errors import BoundsError, FormatError
from bundler.format.header import MAX_MANIFEST, MAX_OPS, OP_RECORD_SIZE
from bundler.format.manifest import format_time, parse, parse_time
from bundler.format.ops import Op, OpTable, OpType, pack_table, produce, unpack_table
from bundler.format.reader import BundleReader
from bundler.format.signing import KeyFileError, load_private_key, load_public_key, unpack_signatures, verify
from ota_common.errors import OtaError

from .conftest import KeyPair, assemble, manifest_for

# --- the manifest ---------------------------------------------------------------


def valid_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(manifest_for([Op(OpType.ZERO, 0, 4096)], 0).encode())
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def one_line_format_error(raw: bytes) -> FormatError:
    with pytest.raises(FormatError) as excinfo:
        parse(raw)
    message = str(excinfo.value)
    assert "\n" not in message
    assert len(message) <= 600
    assert excinfo.value.region == "manifest"
    return excinfo.value


class CountingKey(str):
    """A JSON key that counts how often it is compared or hashed, and stops the
    test once the count passes a budget that only a quadratic search exceeds."""

    calls = 0
    budget = 0

    def _count(self) -> None:
        CountingKey.calls += 1
        if CountingKey.calls > CountingKey.budget:
            raise AssertionError(f"more than {CountingKey.budget} key comparisons: not linear")

    def __eq__(self, other: object) -> bool:
        self._count()
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        self._count()
        return str.__hash__(self)


@pytest.mark.parametrize("n", [1_000, 20_000])
def test_duplicate_key_detection_compares_each_key_a_bounded_number_of_times(n: int) -> None:
    pairs: list[tuple[str, Any]] = [(CountingKey(f"k{i}"), i) for i in range(n)]
    pairs.append((CountingKey(f"k{n - 1}"), -1))  # repeats the key before it: the worst case for a search
    CountingKey.calls, CountingKey.budget = 0, 8 * n
    with pytest.raises(FormatError, match=f"key 'k{n - 1}' appears twice in one object"):
        manifest_mod._no_duplicates(pairs)
    assert CountingKey.calls <= 8 * n


def test_largest_manifest_of_duplicate_keys_is_refused_naming_the_key() -> None:
    body = ",".join(f'"k{i:06}":{i}' for i in range(MAX_MANIFEST // 12))
    raw = ('{"k000000":1,' + body + "}").encode()[:MAX_MANIFEST]
    raw = raw[: raw.rindex(b",")] + b"}"
    assert MAX_MANIFEST - 20 < len(raw) <= MAX_MANIFEST
    assert "appears twice" in str(one_line_format_error(raw))


def test_manifest_larger_than_the_format_allows_is_refused_unparsed() -> None:
    raw = b'{"a":1,' + b" " * (900 << 10) + b'"a":2}'  # the 0.9 MB manifest of issue 6, roughly
    with pytest.raises(BoundsError) as excinfo:
        parse(raw)
    assert excinfo.value.field == "manifest_length"


@pytest.mark.parametrize("digits", [21, 4301, 60_000])
@pytest.mark.parametrize("sign", ["", "-"])
def test_integer_literal_longer_than_any_field_is_a_format_error(digits: int, sign: str) -> None:
    doc = encode(valid_doc())
    raw = doc.replace(b'"security_version":1', b'"security_version":' + sign.encode() + b"9" * digits)
    assert "out of range" in str(one_line_format_error(raw))


def test_long_integer_anywhere_in_the_document_is_a_format_error() -> None:
    doc = valid_doc()
    doc["images"][0]["extra"] = [0]
    raw = encode(doc).replace(b'"extra":[0]', b'"extra":[' + b"7" * 5000 + b"]")
    one_line_format_error(raw)


@pytest.mark.parametrize("literal", [b"1." + b"1" * 5000, b"1e" + b"9" * 5000, b"-0.5e-3"])
def test_non_integer_numbers_are_format_errors(literal: bytes) -> None:
    raw = encode(valid_doc()).replace(b'"security_version":1', b'"security_version":' + literal)
    one_line_format_error(raw)


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00+00:01",  # before year 1 once converted to UTC
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59-00:01",  # after year 9999 in UTC
        "9999-12-31T23:59:59-23:59:59.999999",
        "2026-01-01T00:00:00+24:00",
        "2026-13-01T00:00:00Z",
        "2026-01-01T00:00:00Z" + " " * 100,
        "2" * 5000,
    ],
)
@pytest.mark.parametrize("field", ["created", "expires"])
def test_time_outside_what_datetime_holds_is_a_format_error(text: str, field: str) -> None:
    doc = valid_doc()
    doc[field] = text
    error = one_line_format_error(encode(doc))
    assert field in str(error)


def test_extreme_but_valid_times_round_trip_through_the_canonical_encoding() -> None:
    for text, canonical in [
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
        ("0001-01-01T23:59:59+23:59", "0001-01-01T00:00:59Z"),
        ("9999-12-31T00:00:00-23:59", "9999-12-31T23:59:00Z"),
        ("0999-05-06T07:08:09Z", "0999-05-06T07:08:09Z"),
    ]:
        t = parse_time(text, "created")
        assert format_time(t) == canonical
        assert parse_time(format_time(t), "created") == t
    doc = valid_doc()
    doc["created"] = "0042-01-01T00:00:00Z"
    m = parse(encode(doc))
    assert parse(m.encode()) == m


def test_deep_nesting_and_invalid_utf8_are_format_errors() -> None:
    one_line_format_error(b"[" * (MAX_MANIFEST - 1) + b"]")
    one_line_format_error(b'{"a":' * 10_000 + b"1" + b"}" * 10_000)
    one_line_format_error(b'{"bundle_version":"\xff"}')


# --- a signed manifest through the reader -----------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"security_version":1', b'"security_version":' + b"1" * 5000),
        (b'"created":"2026-01-01T00:00:00Z"', b'"created":"0001-01-01T00:00:00+01:00"'),
        (b'"expires":null', b'"expires":"9999-12-31T23:59:59-12:00"'),
    ],
)
def test_signed_manifest_with_hostile_values_is_a_format_error_after_the_signature(
    signing_key: KeyPair, old: bytes, new: bytes
) -> None:
    ops = [Op(OpType.ZERO, 0, 4096)]
    raw = manifest_for(ops, 0).encode()
    assert old in raw
    data = assemble(raw.replace(old, new), ops, b"", [signing_key.key])
    reader = BundleReader(io.BytesIO(data))
    with pytest.raises(FormatError) as excinfo:
        verify(reader.read_head(), signing_key.keyring)
    assert type(excinfo.value) is FormatError
    assert excinfo.value.region == "manifest"


# --- signature block, op table, zstd frames ---------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"\x01", b"\x01\x00", b"\x01\x00" + bytes(99), b"\xff\xff" + bytes(1600)])
def test_malformed_signature_block_is_a_format_error(raw: bytes) -> None:
    with pytest.raises(FormatError) as excinfo:
        unpack_signatures(raw)
    assert excinfo.value.region == "signatures"


def test_op_table_record_errors_name_the_op() -> None:
    good = Op(OpType.ZERO, 0, 1).pack()
    for bad, message in [
        (good[:1] + b"\x01" + good[2:], "op 3: reserved bytes are not zero"),
        (b"\x09" + good[1:], "op 3: unknown op type 9"),
        (good[:120] + b"\x01" + good[121:], "op 3: reserved bytes are not zero"),
    ]:
        with pytest.raises(FormatError, match=message):
            unpack_table(good * 3 + bad)
    with pytest.raises(FormatError, match="not a multiple of 128"):
        unpack_table(good + b"\x00")


def test_largest_op_table_is_held_as_its_records_not_as_objects() -> None:
    ops = [Op(OpType.REPLACE, i, 1, i, 1, hashlib.sha256(b"%d" % i).digest(), bytes(32)) for i in range(MAX_OPS)]
    raw = pack_table(ops)
    tracemalloc.start()
    try:
        table = unpack_table(bytearray(raw))
        held, _ = tracemalloc.get_traced_memory()
        assert held < len(raw) + (64 << 10), "a list of Op objects would be several times the records"
        assert sum(1 for _ in table) == MAX_OPS
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(raw) + (1 << 20)
    assert isinstance(table, OpTable)
    assert table == ops
    assert (len(table), table[0], table[-1], table[MAX_OPS // 2]) == (MAX_OPS, ops[0], ops[-1], ops[MAX_OPS // 2])
    assert list(table[10:13]) == ops[10:13]
    assert pack_table(table) == raw
    assert len(raw) == MAX_OPS * OP_RECORD_SIZE


def frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def replace_op(data: bytes, payload: bytes) -> Op:
    return Op(
        OpType.REPLACE, 0, len(data), 0, len(payload), hashlib.sha256(payload).digest(), hashlib.sha256(data).digest()
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: b"\x50\x2a\x4d\x18" + (4096).to_bytes(4, "little") + bytes(4096), "bad magic"),  # skippable frame
        (lambda f: f[:3], "bad magic"),
        (lambda f: f[:4], "not a zstd frame"),
        (lambda f: f[:4] + bytes([f[4] | 0x01, 0x07]) + f[5:], "needs dictionary 7"),
        (lambda f: f[:4] + bytes([0x00, 0x60]) + f[7:], "does not declare its content size"),  # 4 MiB window
        (lambda f: f + b"\x00", "does not decode"),
    ],
)
def test_zstd_frame_header_is_checked_before_decoding(make: Any, message: str) -> None:
    data = bytes(range(256)) * 16
    good = frame(data)
    assert good[4] == 0x60, "single segment, 2-byte content size"
    bad = make(good)
    with pytest.raises(FormatError, match=message) as excinfo:
        produce(replace_op(data, bad), bad, 5)
    assert "op 5" in str(excinfo.value)


def test_produce_accepts_the_read_only_view_the_reader_yields() -> None:
    data = b"hello" * 1000
    payload = frame(data)
    assert produce(replace_op(data, payload), memoryview(bytearray(payload)).toreadonly(), 0) == data


# --- key files ------------------------------------------------------------------------


def _der(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


def pem(label: str, der: bytes) -> bytes:
    return f"-----BEGIN {label}-----\n".encode() + base64.encodebytes(der) + f"-----END {label}-----\n".encode()


UNKNOWN_ALGORITHM = _der(0x30, _der(0x06, b"\x2a\x03\x04"))  # AlgorithmIdentifier { 1.2.3.4 }


@pytest.mark.parametrize(
    ("content", "loader"),
    [
        (pem("PUBLIC KEY", _der(0x30, UNKNOWN_ALGORITHM + _der(0x03, bytes(33)))), load_public_key),
        (pem("PRIVATE KEY", _der(0x30, b"\x02\x01\x00" + UNKNOWN_ALGORITHM + _der(0x04, bytes(34)))), load_private_key),
        (pem("PUBLIC KEY", b"\x30\x80" + bytes(40)), load_public_key),
        (b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 15000 + b"\n-----END PUBLIC KEY-----\n", load_public_key),
        (b"\x00" * 100, load_private_key),
    ],
)
def test_key_file_of_unknown_or_broken_key_type_is_a_key_file_error(
    tmp_path: Path, content: bytes, loader: Any
) -> None:
    path = tmp_path / "k.pub"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as excinfo:
        loader(path)
    assert isinstance(excinfo.value, OtaError)
    assert "\n" not in str(excinfo.value)
    assert str(path) in str(excinfo.value)
