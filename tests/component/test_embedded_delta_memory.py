"""Adaptive download of an embedded delta keeps the install memory bound
(docs/bundle-format.md section 9.1, item 8). A signed full bundle at the limits
both op tables can reach: 32768 full ops (each with its block index entry)
and an embedded delta of MAX_EMBEDDED_OPS = 8192 ops (SOURCE_COPY ops, then the worst
delta ops of tests/component/test_delta_worst_case_memory.py: DELTA ops with an
8 MiB dictionary and frames padded to the largest payload, and a deflate-aware
DELTA recompressing 4 MiB). Served by a real HTTP origin (`ota-fleet serve`'s
server) and installed with `[download] adaptive = true` by the real `ota-agent`
CLI onto a simulated device booted from the base: the device runs the embedded
delta, the child's peak RSS stays under 64 MiB, and the slot holds the image."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import zstandard

from agent import sim
from bundler.fleet.serve import BundleServer
from bundler.format import blockindex
from bundler.format.embedded import MAX_EMBEDDED_OPS
from bundler.format.header import MAX_OPS, Header
from bundler.format.manifest import BlockIndexRef, EmbeddedDeltaRef, ImageEntry, Manifest, parse
from bundler.format.ops import Op, OpTable, OpType, pack_table, unpack_table
from bundler.format.signing import generate_key, load_private_key
from bundler.format.writer import write_bundle_file
from tests.component._worst_bundles import COMPATIBLE, helper_floor, measure
from tests.component.test_delta_worst_case_memory import worst_delta

LIMIT_MIB = 64.0
FULL_OPS = MAX_OPS
MiB = 1 << 20


def split_copy(delta: OpTable, base: bytes) -> list[Op]:
    """The worst delta's ops with its first (4 MiB SOURCE_COPY) op cut into enough small
    ones that the table has MAX_EMBEDDED_OPS ops."""
    first, rest = delta[0], list(delta[1:])
    assert first.type is OpType.SOURCE_COPY
    pieces = MAX_EMBEDDED_OPS - len(rest)
    small = first.dst_length // pieces
    ops = []
    for k in range(pieces):
        at = k * small
        n = small if k < pieces - 1 else first.dst_length - at
        ops.append(Op(OpType.SOURCE_COPY, at, n, src_offset=at, src_length=n,
                      dst_sha256=hashlib.sha256(base[at : at + n]).digest()))
    return ops + rest


def embedded_bundle(tmp: Path, private: Path) -> tuple[Path, Path, bytes]:
    base_path, delta_path, image = worst_delta(tmp, private)
    base = base_path.read_bytes()
    raw = delta_path.read_bytes()
    header = Header.unpack(raw[:64])
    delta_manifest = parse(raw[64 : 64 + header.manifest_length])
    delta_ops = split_copy(unpack_table(raw[header.op_table_offset : header.payload_offset]), base)
    delta_payload = raw[header.payload_offset :]
    # The full image in MAX_OPS REPLACE ops (level 1), each with its block index entries.
    size = len(image)
    step = size // FULL_OPS
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
    payload = io.BytesIO()
    ops: list[Op] = []
    index = bytearray()
    for k in range(FULL_OPS):
        at = k * step
        extent = image[at : at + step if k < FULL_OPS - 1 else size]
        frame = compressor.compress(extent)
        op = Op(OpType.REPLACE, at, len(extent), payload.tell(), len(frame), hashlib.sha256(frame).digest(),
                hashlib.sha256(extent).digest())
        payload.write(frame)
        ops.append(op)
        index += blockindex.entries(image, op)
    assert len(ops) == FULL_OPS
    index_ref = BlockIndexRef(payload.tell(), len(index), hashlib.sha256(index).hexdigest())
    payload.write(index)
    table = pack_table(delta_ops)
    table_offset = payload.tell()
    payload.write(table)
    ref = EmbeddedDeltaRef("rootfs", delta_manifest.images[0].base_sha256 or "", len(base), table_offset,
                           len(delta_ops), hashlib.sha256(table).hexdigest(), payload.tell(), len(delta_payload),
                           hashlib.sha256(delta_payload).hexdigest())
    payload.write(delta_payload)
    entry = ImageEntry("rootfs", size, hashlib.sha256(image).hexdigest(), 0, len(ops))
    manifest = Manifest("9.9.9", 1, COMPATIBLE, datetime(2026, 1, 1, tzinfo=UTC), None, (entry,), len(ops),
                        hashlib.sha256(pack_table(ops)).hexdigest(), payload.tell(), block_index=index_ref,
                        embedded_deltas=(ref,))
    payload.seek(0)
    out = tmp / "www" / "embedded.otab"
    write_bundle_file(out, manifest, ops, payload, [load_private_key(private)])
    return base_path, out, image


def test_adaptive_install_of_the_worst_embedded_delta_stays_under_64_mib(tmp_path: Path, server: BundleServer) -> None:
    private, public = generate_key(tmp_path / "key")
    base, bundle, image = embedded_bundle(tmp_path, private)
    device = tmp_path / "device"
    sim.init(sim.SimSpec(device, base, public, COMPATIBLE, slot_size=-(-len(image) // MiB) * MiB))
    config = device / "agent.toml"
    config.write_text(config.read_text() + "\n[download]\nadaptive = true\n")
    floor = helper_floor(tmp_path / "floor.log")
    agent = str(Path(sys.executable).parent / "ota-agent")

    run = measure([agent, "-c", str(config), "install", f"{server.url}/embedded.otab"], tmp_path / "run.log")

    print(f"worst embedded delta: peak RSS {run.peak_rss_mib:.1f} MiB (floor {floor.peak_rss_mib:.1f})")
    assert run.rc == 0, run.output
    assert "embedded delta 0 for the base" in run.output, run.output
    with (device / "slot-B.img").open("rb") as f:
        assert hashlib.sha256(f.read(len(image))).hexdigest() == hashlib.sha256(image).hexdigest()
    status = measure([agent, "-c", str(config), "status", "--json"], tmp_path / "status.log")
    downloaded = json.loads(status.output)["last_result"]["downloaded"]
    raw = bundle.read_bytes()
    header = Header.unpack(raw[:64])
    ref = parse(raw[64 : 64 + header.manifest_length]).embedded_deltas[0]
    delta = 128 * ref.table_count + ref.payload_length
    assert downloaded == header.payload_offset + 2 + delta, "the head, two probes and the delta; no full op"
    assert run.peak_rss_kib > 2 * floor.peak_rss_kib
    assert run.peak_rss_mib < LIMIT_MIB, f"peak RSS {run.peak_rss_mib:.1f} MiB"
