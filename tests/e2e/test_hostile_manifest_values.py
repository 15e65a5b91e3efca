"""A genuinely signed bundle whose manifest holds values the parser cannot take
(an integer too long for Python's int(), a time that overflows when converted to
UTC, a key twice in one object, a manifest larger than the format allows) is
refused through the CLI with exit status 1, exactly one error line and no
traceback, recorded as the last result and in the outbox, and changes nothing:
neither slot, nor the bootloader, nor the slot records."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bundler.format.header import Header
from bundler.format.manifest import ImageEntry, Manifest
from bundler.format.ops import Op, OpType, pack_table
from bundler.format.signing import load_private_key, pack_signatures, sign
from tests.e2e._sim import COMPATIBLE, SimDevice
from tests.e2e.conftest import KeyPair

SIZE = 1 << 20


def signed_bundle(key: KeyPair, out: Path, rewrite: tuple[bytes, bytes]) -> Path:
    """A one-image bundle of a single ZERO op whose canonical manifest has one
    piece replaced, signed by `key` over exactly the bytes that result."""
    ops = [Op(OpType.ZERO, 0, SIZE)]
    manifest = Manifest(
        bundle_version="6.6.6",
        security_version=9,
        compatible=COMPATIBLE,
        created=datetime(2026, 1, 1, tzinfo=UTC),
        expires=None,
        images=(ImageEntry("rootfs", SIZE, hashlib.sha256(bytes(SIZE)).hexdigest(), 0, 1),),
        op_count=1,
        op_table_sha256=hashlib.sha256(pack_table(ops)).hexdigest(),
        payload_length=0,
    ).encode()
    old, new = rewrite
    assert old in manifest
    manifest = manifest.replace(old, new)
    header = Header(len(manifest), 102, 1, 0).pack() if len(manifest) <= 1 << 16 else _oversized(len(manifest))
    signatures = pack_signatures(sign([load_private_key(key.private)], header, manifest))
    out.write_bytes(header + manifest + signatures + pack_table(ops))
    return out


def _oversized(manifest_length: int) -> bytes:
    return (
        b"\x89OTAB\r\n\x1a\x01\x00\x40\x00"
        + manifest_length.to_bytes(4, "little")
        + (102).to_bytes(4, "little")
        + (1).to_bytes(4, "little")
        + bytes(8 + 32)
    )


CASES = {
    "integer of 5000 digits": ((b'"security_version":9', b'"security_version":' + b"9" * 5000), "out of range"),
    "time before year 1 in UTC": (
        (b'"created":"2026-01-01T00:00:00Z"', b'"created":"0001-01-01T00:00:00+05:00"'),
        "outside the years 1 to 9999",
    ),
    "time after year 9999 in UTC": (
        (b'"expires":null', b'"expires":"9999-12-31T23:00:00-23:59"'),
        "outside the years 1 to 9999",
    ),
    "key twice in one object": ((b'"security_version":9', b'"security_version":9,"security_version":1'), "twice"),
    "manifest of 0.9 MB": ((b'"security_version":9', b'"security_version":9' + b" " * 900_000), "manifest_length"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_signed_bundle_with_unparseable_manifest_value_is_refused_in_one_recorded_line(
    case: str, device: SimDevice, signing_key: KeyPair, tmp_path: Path
) -> None:
    rewrite, reason = CASES[case]
    bundle = signed_bundle(signing_key, tmp_path / "hostile.otab", rewrite)
    before = device.snapshot()
    outbox_before = len(device.outbox())

    run = device.install(bundle)

    assert run.rc == 1
    line = run.one_error_line()
    assert reason in line, line
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B"))
    assert after.bootloader == before.bootloader
    assert after.agent_state()["slots"] == before.agent_state()["slots"]
    last = device.status()["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert reason in last["reason"]
    assert [e["result"] for e in device.outbox()[outbox_before:]] == ["failed"]
