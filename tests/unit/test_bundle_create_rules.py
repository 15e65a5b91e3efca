"""`ota-bundle create` refuses exactly the values the device's reader rejects:
for arbitrary version, compatible, slot class and security version values,
`bundler.build.check` names the first option whose value the reader's own
manifest parser (`bundler.format.manifest.parse`) refuses, and accepts the
spec when the reader accepts every value."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundler.build import BundleSpec, ImageSource, OptionError, check
from bundler.format import manifest as manifest_mod
from bundler.format.errors import FormatError
from bundler.format.manifest import ImageEntry, Manifest
from tests.unit.conftest import KeyPair

DIGEST = "ab" * 32


@pytest.fixture
def workdir(tmp_path: Path, signing_key: KeyPair) -> Path:
    (tmp_path / "appfs.img").write_bytes(random.Random(2).randbytes(3000))
    (tmp_path / "signing.key").write_bytes(signing_key.private_path.read_bytes())
    return tmp_path


def reader_rejects(**fields: object) -> bool:
    """Whether the device-side manifest parser refuses a manifest carrying these values."""
    manifest = Manifest(
        bundle_version="1",
        security_version=0,
        compatible="board",
        created=datetime(2026, 1, 1, tzinfo=UTC),
        expires=None,
        images=(ImageEntry("rootfs", 1, DIGEST, 0, 1),),
        op_count=1,
        op_table_sha256=DIGEST,
        payload_length=0,
    )
    try:
        manifest_mod.parse(replace(manifest, **fields).encode())
    except FormatError:
        return True
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    version=st.text(min_size=0, max_size=140),
    compatible=st.text(alphabet="ab-_.:+ \n/é0", max_size=10),
    slot_class=st.text(alphabet="ab-_.:+ \t0", max_size=6),
    security_version=st.integers(min_value=-(1 << 64), max_value=1 << 64),
)
def test_check_refuses_exactly_what_the_reader_rejects(
    workdir: Path, version: str, compatible: str, slot_class: str, security_version: int
) -> None:
    spec = BundleSpec(
        image=(ImageSource(slot_class, workdir / "appfs.img"),),
        key=workdir / "signing.key",
        version=version,
        security_version=security_version,
        compatible=compatible,
    )
    verdicts = {
        "--version": reader_rejects(bundle_version=version),
        "--security-version": reader_rejects(security_version=security_version),
        "--compatible": reader_rejects(compatible=compatible),
        "--image": reader_rejects(images=(ImageEntry(slot_class, 1, DIGEST, 0, 1),)),
    }
    refused: str | None = None
    try:
        check(spec, workdir / "out.otab")
    except OptionError as e:
        refused = e.option
    first_rejected_by_reader = next((option for option, bad in verdicts.items() if bad), None)
    assert refused == first_rejected_by_reader, verdicts
