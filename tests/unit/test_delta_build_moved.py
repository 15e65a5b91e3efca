"""Delta build time on compressed images (docs/delta.md "Build time"): data that moved
unchanged by any byte shift is copied instead of verified and delta'd (`bundler.moved`),
only the other streams are verified, and the bundles still install byte-exact."""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from bundler import moved, streams
from bundler.format.deflate import Codec
from bundler.format.ops import OpType
from bundler.moved import MIN_MOVED, Moved, find_moved, moved_streams, split, without
from bundler.planner import plan_delta
from bundler.streams import Stream, find_streams, verifying
from tests.unit.conftest import KeyPair, SimSlot, stream_install
from tests.unit.test_delta import BytesSource, build_delta, text_like

KiB = 1 << 10


def squashfs_like(files: list[bytes]) -> bytes:
    """Back-to-back zlib blocks of 128 KiB of each file (level 9, as mksquashfs writes them),
    no gaps: an edit to one file shifts every block after it by an odd number of bytes."""
    return b"".join(zlib.compress(f[at : at + 128 * KiB], 9) for f in files for at in range(0, len(f), 128 * KiB))


@pytest.fixture(scope="module")
def shifted_pair() -> tuple[bytes, bytes, list[bytes]]:
    rng = random.Random(11)
    files = [text_like(rng, 300 * KiB) for _ in range(8)]
    edited = list(files)
    edited[2] = edited[2][:7000] + b"a security fix" + edited[2][7000:]
    v1 = rng.randbytes(4096) + squashfs_like(files)
    v2 = rng.randbytes(4096) + squashfs_like(edited)
    return v1, v2, edited


def test_blocks_that_moved_by_an_odd_shift_are_copied_and_the_bundle_installs_exact(
    tmp_path: Path, signing_key: KeyPair, shifted_pair: tuple[bytes, bytes, list[bytes]]
) -> None:
    v1, v2, _ = shifted_pair
    assert v1.find(v2[-200_000:]) % 4096, "the unchanged tail moved off the 4 KiB grid"
    plan = list(plan_delta(v2, len(v2), v1, len(v1)))
    copies = [p for p in plan if p.type is OpType.SOURCE_COPY]
    for p in copies:
        assert v2[p.dst_offset : p.dst_offset + p.dst_length] == v1[p.src_offset : p.src_offset + p.dst_length]
    copied = sum(p.dst_length for p in copies)
    assert copied > len(v2) * 0.6, "the files after the edited one, and the ones before it"
    assert any((p.src_offset - p.dst_offset) % 4096 for p in copies), "copies at a byte shift"
    deltas = [p for p in plan if p.type is OpType.DELTA]
    assert sum(p.dst_length for p in deltas) < len(v2) * 0.3, "only the edited file's blocks are delta'd"
    assert any(piece.codec is Codec.ZLIB for p in deltas for piece in p.pieces), "still deflate-aware"
    data = build_delta(tmp_path, signing_key, v1, v2)
    slot = SimSlot()
    stream_install(data, signing_key.keyring, slot, BytesSource(v1, slot))
    assert bytes(slot.data) == v2


def test_only_streams_that_did_not_move_unchanged_are_verified(
    shifted_pair: tuple[bytes, bytes, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2, _ = shifted_pair
    checked: list[int] = []

    def counting(data: bytes, streams: Sequence[Stream], pool: ThreadPoolExecutor | None) -> Future[list[Stream]]:
        checked.extend(s.offset for s in streams)
        return verifying(data, streams, pool)

    monkeypatch.setattr(moved, "verifying", counting)
    with ThreadPoolExecutor(2) as pool:
        _, pending, runs = moved_streams(v2, v1, [(0, len(v2))], pool)
        streams = pending.result()
    every = find_streams(v2, verify=False)
    assert 0 < len(checked) <= len(every) // 3, "the edited file's blocks (and the one straddling a run end)"
    for s in every:
        inside = any(r.offset <= s.offset and s.offset + s.length <= r.offset + r.length for r in runs)
        assert inside != (s.offset in checked), "a stream is either copied or verified"
    assert streams == [s for s in find_streams(v2) if s.offset in checked]


def test_verified_keeps_exactly_what_a_verifying_scan_keeps() -> None:
    rng = random.Random(3)
    content = text_like(rng, 60 * KiB)
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_FILTERED)  # a deflate the device does not run
    filtered = c.compress(content) + c.flush()
    gz_body = zlib.compressobj(6, zlib.DEFLATED, -15, 9)
    body = gz_body.compress(content[:30000]) + gz_body.flush()
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + body + bytes(8)
    data = b"x" * 99 + zlib.compress(content, 9) + b"y" * 7 + filtered + gz + zlib.compress(content[:9000], 1)
    unverified = find_streams(data, verify=False)
    assert len(unverified) == 4
    assert verifying(data, unverified).result() == find_streams(data)
    assert [s.level for s in find_streams(data)] == [9, 6, 1]


def test_a_scan_split_across_the_pool_finds_what_one_scan_finds_streams_across_a_cut_included(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams, "_MIN_PART", 64 * KiB)  # split this small image too
    monkeypatch.setattr(streams, "_MAX_PARTS", 3)  # in thirds
    rng = random.Random(5)
    files = [text_like(rng, 300 * KiB) for _ in range(8)]
    blocks = [zlib.compress(f[at : at + 128 * KiB], 9) for f in files for at in range(0, len(f), 128 * KiB)]
    gz_body = zlib.compressobj(9, zlib.DEFLATED, -15, 8)
    member = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + gz_body.compress(files[0][:50000]) + gz_body.flush()
    first, rest = b"".join(blocks[:4]), b"".join(blocks[4:])
    # Three parts cut the image in thirds: pad its start until the first cut falls
    # inside the gzip member's magic bytes (between two zlib blocks); the second cut then
    # falls inside a zlib block.
    pad = next(p for p in range(1 << 20) if (p + len(first) + len(member) + len(rest)) // 3 == p + len(first) + 1)
    image = rng.randbytes(pad) + first + member + rest
    cut1, cut2 = len(image) // 3, len(image) * 2 // 3
    one = find_streams(image, verify=False)
    assert len(one) == len(blocks) + 1
    assert any(s.codec is Codec.DEFLATE and s.offset == cut1 + 9 for s in one)  # its magic began before the cut
    assert any(s.offset < cut2 < s.offset + s.length for s in one)
    with ThreadPoolExecutor(3) as pool:
        assert find_streams(image, pool, verify=False) == one
        spans = [(0, cut1 - 4096), (cut1 - 10, cut2 + 300 * KiB)]
        assert find_streams(image, pool, verify=False, within=spans) == find_streams(image, verify=False, within=spans)


def test_a_moved_run_never_cuts_a_stream_that_did_not_move_with_it() -> None:
    rng = random.Random(5)
    block = zlib.compress(text_like(rng, 100 * KiB), 9)
    old = zlib.compress(text_like(rng, 50 * KiB), 9)
    new = zlib.compress(text_like(rng, 50 * KiB), 9)
    common = 5  # the two next streams start with the same bytes (a header), as gzip members do
    new = old[:common] + new[common:]
    v1 = rng.randbytes(1000) + block + old + rng.randbytes(1000)
    v2 = rng.randbytes(3) + block + new + rng.randbytes(1000)
    streams = find_streams(v2, verify=False)
    runs = find_moved(v2, v1, streams, find_streams(v1, verify=False), [(0, len(v2))])
    assert runs == [Moved(3, len(block), 1000)], "the run stops where the next stream begins"
    _, pending, found = moved_streams(v2, v1, [(0, len(v2))])
    assert found == runs, "the same, seeded without inflating the target"
    assert [s.offset for s in pending.result()] == [3 + len(block)], "the next stream is verified whole"


def test_runs_shorter_than_the_minimum_stay_in_the_delta() -> None:
    rng = random.Random(8)
    small = zlib.compress(text_like(rng, 8 * KiB), 9)
    assert len(small) < MIN_MOVED
    v1 = rng.randbytes(500) + small + rng.randbytes(500)
    v2 = rng.randbytes(77) + small + rng.randbytes(500)
    assert find_moved(v2, v1, find_streams(v2, verify=False), find_streams(v1, verify=False), [(0, len(v2))]) == []


def test_spans_split_around_moved_runs() -> None:
    runs = [Moved(10, 5, 100), Moved(20, 10, 0)]
    assert without([(0, 12), (12, 40)], [Moved(12, 3, 0), Moved(20, 10, 0)]) == [(0, 12), (15, 20), (30, 40)]
    assert list(split(0, 40, runs, [r.offset for r in runs])) == [
        (0, 10, None), (10, 5, 100), (15, 5, None), (20, 10, 0), (30, 10, None)
    ]
