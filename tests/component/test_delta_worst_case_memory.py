"""The install memory bound holds for the worst delta bundle the reader accepts.

A signed delta bundle at the delta limits: a maximal SOURCE_COPY, DELTA ops
whose dictionary is MAX_DICT bytes of the base and whose frame (raw blocks,
the largest window a DELTA may declare) is padded to the largest payload, a
deflate-aware DELTA whose 4 MiB of decoded content is recompressed on the
device, and one-byte ops up to the MAX_DELTA_OPS records a delta bundle may
have. It is installed with the real `ota-agent` CLI on a simulated device
booted from the base; the child's peak RSS must stay under 64 MiB
(docs/bundle-format.md section 9.1) and the target slot must hold the image.
"""

from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from agent import sim
from bundler.format.deflate import Codec, deflate
from bundler.format.header import MAX_DELTA_OPS
from bundler.format.manifest import ImageEntry, Manifest
from bundler.format.ops import (
    MAX_DELTA_WINDOW,
    MAX_DICT,
    MAX_OP_DST,
    MAX_OP_PAYLOAD,
    DictExtent,
    Op,
    OpType,
    Origin,
    Piece,
    pack_delta,
    pack_table,
)
from bundler.format.signing import generate_key, load_private_key
from bundler.format.writer import write_bundle_file
from tests.component._worst_bundles import COMPATIBLE, helper_floor, measure, raw_frame

LIMIT_MIB = 64.0
MiB = 1 << 20


def text(rng: random.Random, n: int) -> bytes:
    words = [rng.randbytes(rng.randint(2, 8)).hex().encode() for _ in range(2000)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def worst_delta(tmp: Path, key: Path) -> tuple[Path, Path, bytes]:
    """(base image, bundle, target image)."""
    rng = random.Random(4)
    base = rng.randbytes(MAX_DICT + MAX_OP_DST)
    window = MAX_DELTA_WINDOW.bit_length() - 1
    dictionary = DictExtent(Origin.BASE, 0, MAX_DICT, hashlib.sha256(base[:MAX_DICT]).digest())
    pieces: list[tuple[Op, bytes, bytes]] = []  # op (payload fields unset), payload, extent
    first = base[:MAX_OP_DST]
    pieces.append((Op(OpType.SOURCE_COPY, 0, MAX_OP_DST, src_offset=0, src_length=MAX_OP_DST), b"", first))
    for _ in range(3):
        data = rng.randbytes(MAX_OP_DST)  # incompressible: the frame is raw blocks, padded to the largest payload
        frame = raw_frame(data, window_log=window, content_size=True, length=MAX_OP_PAYLOAD)
        pieces.append((Op(OpType.DELTA, 0, MAX_OP_DST, src_length=MAX_DICT), pack_delta([dictionary], [], frame), data))
    content = text(rng, MAX_OP_DST)
    packed = deflate(content, Codec.ZLIB, 1, 8)
    assert len(packed) < MAX_OP_DST
    frame = raw_frame(content, window_log=window, content_size=True, length=MAX_OP_PAYLOAD)
    piece = Piece(Codec.ZLIB, MAX_OP_DST, len(packed), 1, 8)
    deflating = pack_delta([dictionary], [piece], frame)
    pieces.append((Op(OpType.DELTA, 0, len(packed), src_length=MAX_DICT), deflating, packed))
    # As many ops as a delta bundle may have: the table is held beside the DELTA ops' dictionaries.
    pieces += [(Op(OpType.ZERO, 0, 1), b"", b"\0")] * (MAX_DELTA_OPS - len(pieces))
    ops: list[Op] = []
    payload = tmp / "payload"
    at = dst = 0
    with payload.open("wb") as f:
        for op, data, extent in pieces:
            fields = {"dst_offset": dst, "dst_sha256": hashlib.sha256(extent).digest()}
            if data:
                fields |= {"payload_offset": at, "payload_length": len(data)}
                fields["payload_sha256"] = hashlib.sha256(data).digest()
                f.write(data)
                at += len(data)
            ops.append(replace(op, **fields))
            dst += len(extent)
    image = b"".join(extent for _, _, extent in pieces)
    digest, base_digest = hashlib.sha256(image).hexdigest(), hashlib.sha256(base).hexdigest()
    entry = ImageEntry("rootfs", len(image), digest, 0, len(ops), base_digest, len(base))
    manifest = Manifest(
        "9.9.9", 1, COMPATIBLE, datetime(2026, 1, 1, tzinfo=UTC), None, (entry,), len(ops),
        hashlib.sha256(pack_table(ops)).hexdigest(), at,
    )
    (tmp / "base.img").write_bytes(base)
    write_bundle_file(tmp / "delta.otab", manifest, ops, payload, [load_private_key(key)])
    payload.unlink()
    return tmp / "base.img", tmp / "delta.otab", image


def test_worst_delta_bundle_installs_under_64_mib_of_rss(tmp_path: Path) -> None:
    private, public = generate_key(tmp_path / "key")
    base, bundle, image = worst_delta(tmp_path, private)
    device = tmp_path / "device"
    sim.init(sim.SimSpec(device, base, public, COMPATIBLE, slot_size=-(-len(image) // MiB) * MiB))
    floor = helper_floor(tmp_path / "floor.log")
    agent = str(Path(sys.executable).parent / "ota-agent")

    run = measure([agent, "-c", str(device / "agent.toml"), "install", str(bundle)], tmp_path / "run.log")

    print(f"worst delta: peak RSS {run.peak_rss_mib:.1f} MiB (floor {floor.peak_rss_mib:.1f})")
    assert run.rc == 0, run.output
    with (device / "slot-B.img").open("rb") as f:
        assert hashlib.sha256(f.read(len(image))).hexdigest() == hashlib.sha256(image).hexdigest()
    assert run.peak_rss_kib > 2 * floor.peak_rss_kib
    assert run.peak_rss_mib < LIMIT_MIB, f"peak RSS {run.peak_rss_mib:.1f} MiB"
