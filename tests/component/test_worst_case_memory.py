"""The install memory bound holds for the worst bundles the reader accepts.

Each worst bundle (tests/component/_worst_bundles.py) sits exactly at the
format's limits, is signed by the device's key, and is installed with the real
`ota-agent` CLI in a fresh process on a simulated device; the child's peak RSS
must stay under the 64 MiB of invariant 2 (docs/architecture.md, docs/bundle-format.md)
section 9.1. The install must also succeed and leave the image byte-exact in
the target slot, so the bound is not met by refusing the bundle.

The bundles that were legal before the limits were tightened (8 MiB ops, zstd
frames without a content size and a 128 MiB window, 65,536 ops, a 1 MiB
manifest) peaked at 86-106 MiB; tests/unit/test_format_memory_limits.py shows
the reader now refuses each of them before it allocates for them.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from agent import sim
from bundler.format.header import HEADER_SIZE, MAX_MANIFEST, MAX_OPS, Header
from bundler.format.ops import MAX_OP_DST, MAX_OP_PAYLOAD, MAX_WINDOW, OpType, unpack_table
from bundler.format.signing import generate_key, load_private_key
from tests.component._worst_bundles import COMPATIBLE, WorstBundle, helper_floor, measure, worst_bundles

LIMIT_MIB = 64.0
NAMES = ("max-replace-ops", "max-op-count", "everything-at-once")


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    private, public = generate_key(tmp_path_factory.mktemp("worst-key"))
    return Keys(private, public)


@pytest.fixture(scope="module", params=NAMES)
def bundle(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keys: Keys
) -> Iterator[WorstBundle]:
    out = tmp_path_factory.mktemp("worst-bundles")
    made = worst_bundles(out, load_private_key(keys.private))[request.param]()
    yield made
    made.path.unlink()


def agent_cli() -> str:
    script = Path(sys.executable).parent / "ota-agent"
    assert script.exists(), "the package is installed (make venv), so the ota-agent entry point exists"
    return str(script)


def slot_sha256(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while length:
            chunk = f.read(min(length, 1 << 20))
            h.update(chunk)
            length -= len(chunk)
    return h.hexdigest()


def assert_at_the_limits(bundle: WorstBundle) -> None:
    """The bundle really is a worst case: whichever limits it targets, it reaches."""
    raw = bundle.path.read_bytes()
    header = Header.unpack(raw[:HEADER_SIZE])
    ops = unpack_table(raw[header.op_table_offset : header.payload_offset])
    replace = [op for op in ops if op.type is OpType.REPLACE]
    biggest = max(replace, key=lambda op: op.dst_length)
    assert biggest.dst_length == MAX_OP_DST
    assert biggest.payload_length == MAX_OP_PAYLOAD
    frame = raw[header.payload_offset + biggest.payload_offset :][:HEADER_SIZE]
    params = zstandard.get_frame_parameters(frame)
    assert (params.window_size, params.content_size) == (MAX_WINDOW, MAX_OP_DST)
    if bundle.name != "max-replace-ops":
        assert header.op_count == MAX_OPS
    if bundle.name == "everything-at-once":
        assert header.manifest_length == MAX_MANIFEST
        assert header.signature_length == 2 + 16 * 100


def test_worst_legal_bundle_installs_under_64_mib_of_rss(bundle: WorstBundle, keys: Keys, tmp_path: Path) -> None:
    assert_at_the_limits(bundle)
    factory = tmp_path / "factory.img"
    factory.write_bytes(bytes(4096))
    device = tmp_path / "device"
    sim.init(
        sim.SimSpec(device, factory, keys.public, COMPATIBLE, slot_size=-(-bundle.image_size // 4096) * 4096 + 4096)
    )
    floor = helper_floor(tmp_path / "floor.log")

    run = measure([agent_cli(), "-c", str(device / "agent.toml"), "install", str(bundle.path)], tmp_path / "run.log")

    print(f"{bundle.name}: {bundle.op_count} ops, peak RSS {run.peak_rss_mib:.1f} MiB (floor {floor.peak_rss_mib:.1f})")
    assert run.rc == 0, run.output
    assert "installed version 9.9.9 into slot B" in run.output
    assert slot_sha256(device / "slot-B.img", bundle.image_size) == bundle.image_sha256
    assert run.peak_rss_kib > 2 * floor.peak_rss_kib, "the number is the agent's, not the measuring helper's"
    assert run.peak_rss_mib < LIMIT_MIB, f"{bundle.name}: peak RSS {run.peak_rss_mib:.1f} MiB"
