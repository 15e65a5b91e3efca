"""A payload (or the op table) damaged on the wire is caught by its hash; when the
stream can read a range again (an HTTP source: `BundleStream` over
`agent.ranged`), the reader fetches exactly that range again, a bounded number
of times, instead of failing. Damage before the signature check is a signature
failure; a stream that cannot refetch fails with the hash error, as before."""

from __future__ import annotations

import io
import random

import pytest

from agent.config import DownloadConfig
from agent.ranged_scripted import Fault, FaultKind, ScriptedRangeSource
from agent.sources import BundleStream
from bundler.build import BundleSpec, build_full
from bundler.format.errors import HashMismatchError, SignatureError
from bundler.format.header import HEADER_SIZE, Header
from bundler.format.ops import OpType, produce
from bundler.format.reader import REFETCHES, BundleReader
from bundler.format.signing import Keyring, verify

from .conftest import KeyPair

MiB = 1 << 20
LIMITS = DownloadConfig(retries=2, retry_backoff=0.0, retry_backoff_max=0.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair) -> tuple[bytes, bytes]:
    rng = random.Random(3)
    image = rng.randbytes(MiB) + bytes(MiB) + rng.randbytes(MiB // 2)
    tmp = tmp_path_factory.mktemp("refetch")
    (tmp / "image").write_bytes(image)
    build_full(BundleSpec(tmp / "image", signing_key.private_path, "1.0", 1, "board", level=1, threads=1),
               tmp / "b.otab")
    return (tmp / "b.otab").read_bytes(), image


def install(stream: object, keyring: Keyring) -> bytes:
    reader = BundleReader(stream)  # type: ignore[arg-type]
    verified = verify(reader.read_head(), keyring)
    ops = reader.read_op_table(verified)
    out = bytearray()
    for index, op, payload in reader.iter_payload(ops):
        out += bytes(op.dst_length) if payload is None else produce(op, payload, index)
    return bytes(out)


def over(source: ScriptedRangeSource) -> BundleStream:
    return BundleStream(source.stream(), source.name, LIMITS.max_bytes, ranges=source)


def payload_ranges(data: bytes, keyring: Keyring) -> list[tuple[int, int]]:
    reader = BundleReader(io.BytesIO(data))
    verified = verify(reader.read_head(), keyring)
    ops = reader.read_op_table(verified)
    base = verified.header.payload_offset
    return [(base + op.payload_offset, op.payload_length) for op in ops if op.type is not OpType.ZERO]


def test_a_flipped_payload_byte_is_caught_and_only_that_op_s_range_is_fetched_again(
    bundle: tuple[bytes, bytes], signing_key: KeyPair
) -> None:
    data, image = bundle
    start, length = payload_ranges(data, signing_key.keyring)[-1]
    source = ScriptedRangeSource(data, [Fault(FaultKind.FLIP, at=start + length // 2)], LIMITS)
    stream = over(source)
    assert install(stream, signing_key.keyring) == image
    assert source.requests == [(0, None), (start, start + length)]
    assert stream.refetches == 1
    assert stream.downloaded == len(data) + length


def test_a_damaged_op_table_is_fetched_again(bundle: tuple[bytes, bytes], signing_key: KeyPair) -> None:
    data, image = bundle
    header = Header.unpack(data[:HEADER_SIZE])
    source = ScriptedRangeSource(data, [Fault(FaultKind.FLIP, at=header.op_table_offset + 3)], LIMITS)
    assert install(over(source), signing_key.keyring) == image
    assert source.requests[1] == (header.op_table_offset, header.payload_offset)


def test_a_range_damaged_every_time_fails_with_the_hash_error_after_bounded_refetches(
    bundle: tuple[bytes, bytes], signing_key: KeyPair
) -> None:
    data, _ = bundle
    start, _ = payload_ranges(data, signing_key.keyring)[0]

    class AlwaysDamaged(ScriptedRangeSource):
        def _attempt(self, offset, end, pace):  # type: ignore[no-untyped-def]
            at = start + 7 if offset in (0, start) else None  # the first read and every refetch
            if at is not None:
                self.script.insert(0, Fault(FaultKind.FLIP, at=at))
            return super()._attempt(offset, end, pace)

    source = AlwaysDamaged(data, [], LIMITS)
    with pytest.raises(HashMismatchError) as info:
        install(over(source), signing_key.keyring)
    assert info.value.op_index == 0
    assert len(source.requests) == 1 + REFETCHES


def test_a_stream_that_cannot_refetch_fails_with_the_hash_error(
    bundle: tuple[bytes, bytes], signing_key: KeyPair
) -> None:
    data, _ = bundle
    start, _ = payload_ranges(data, signing_key.keyring)[0]
    damaged = bytearray(data)
    damaged[start] ^= 1
    with pytest.raises(HashMismatchError):
        install(io.BytesIO(bytes(damaged)), signing_key.keyring)


def test_damage_in_the_manifest_is_a_signature_failure_never_a_refetch(
    bundle: tuple[bytes, bytes], signing_key: KeyPair
) -> None:
    data, _ = bundle
    header = Header.unpack(data[:HEADER_SIZE])
    source = ScriptedRangeSource(data, [Fault(FaultKind.FLIP, at=header.manifest_offset + 5)], LIMITS)
    with pytest.raises(SignatureError):
        install(over(source), signing_key.keyring)
    assert source.requests == [(0, None)]
