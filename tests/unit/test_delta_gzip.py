"""GNU gzip members as DEFLATE_BLOCKS pieces (docs/delta.md, "Compressed content"):

- a member made by the real `gzip -9n` that no plain zlib deflate reproduces
  (gzip ends blocks where zlib does not) is reproduced by zlib told to end
  its blocks where gzip did, and the planner carries its content that way;
- a changed .gz file in an image becomes a small delta of its uncompressed
  content that the device turns back into gzip's exact bytes;
- hostile block lists (overrunning, empty blocks, past the content) and a
  DEFLATE_BLOCKS dictionary extent are refused with a clear error; a wrong
  but well-formed list fails the op before anything is written.
"""

from __future__ import annotations

import functools
import hashlib
import random
import shutil
import zlib
from dataclasses import replace

import pytest
import zstandard

from bundler.deflateblocks import block_ends
from bundler.executor import Inputs, make_op
from bundler.format.apply import run_op
from bundler.format.deflate import Codec, blocks_prefix, deflate, deflate_blocks
from bundler.format.errors import FormatError, HashMismatchError
from bundler.format.ops import DictExtent, Op, OpType, Origin, Piece, pack_delta, parse_delta
from bundler.planner import Unit, plan_delta
from bundler.streams import find_streams
from tests.fixtures.synthetic import gnu_gzip, prose
from tests.unit.test_delta import Images

KiB = 1024
pytestmark = pytest.mark.skipif(shutil.which("gzip") is None, reason="needs GNU gzip (apt-get install gzip)")


def body(member: bytes) -> bytes:
    return member[10:-8]  # -n: no name; the 10-byte header and the CRC/size trailer


@functools.cache
def members() -> tuple[bytes, bytes, bytes]:
    """(v1 content, v2 content: an entry added at the top, as a changelog grows; v2's member)."""
    v1 = prose(1, 200 * KiB)
    v2 = prose(2, 3 * KiB) + v1
    return v1, v2, gnu_gzip(v2)


def test_zlib_reproduces_gnu_gzip_once_told_where_its_blocks_end() -> None:
    _, content, member = members()
    raw = body(member)
    assert all(deflate(content, Codec.DEFLATE, level, mem) != raw for level in range(1, 10) for mem in (8, 9))
    ends = block_ends(raw)
    assert ends is not None
    assert len(ends) > 1
    assert ends[-1] == len(content)
    blocks = [b - a for a, b in zip([0, *ends], ends, strict=False)][:-1]
    assert deflate_blocks(content, blocks, 9, 9) == raw
    [stream] = find_streams(member)
    assert (stream.codec, stream.level, stream.mem_level, list(stream.blocks)) == (Codec.DEFLATE, 9, 9, blocks)


def test_block_ends_reads_nothing_from_bytes_that_are_not_deflate() -> None:
    assert block_ends(b"\xff" * 64) is None  # reserved block type
    assert block_ends(body(members()[2])[:100]) is None  # cut inside its first block


@functools.cache
def image_pair() -> tuple[bytes, bytes]:
    """Images holding the changelog's v1 and v2 .gz, at other offsets, amid other data."""
    v1, _, member2 = members()
    filler = random.Random(4).randbytes(256 * KiB)
    base = filler + gnu_gzip(v1)
    base += bytes(-len(base) % 4096)
    target = bytes(64 * KiB) + filler + member2
    target += bytes(-len(target) % 4096)
    return base, target


def gzip_delta() -> tuple[Op, bytes]:
    base, target = image_pair()
    planned = [p for p in plan_delta(target, len(target), base, len(base)) if p.type is OpType.DELTA]
    [p] = [p for p in planned if any(piece.codec is Codec.DEFLATE_BLOCKS for piece in p.pieces)]
    return make_op(p, Inputs(target, base), 3)


def test_a_changed_gnu_gzip_file_is_a_small_delta_the_device_rebuilds_exactly() -> None:
    base, target = image_pair()
    op, payload = gzip_delta()
    assert op.type is OpType.DELTA
    member = members()[2]
    assert len(payload) < len(member) / 5, "the content is delta'd, not gzip's bytes"
    made = run_op(op, payload, 0, Images(base, target), len(base))
    assert made == target[op.dst_offset : op.dst_offset + op.dst_length]


def with_blocks(op: Op, payload: bytes, prefix: bytes) -> tuple[Op, bytes]:
    """The op with its DEFLATE_BLOCKS piece's block list replaced by `prefix` (frame re-made
    without a dictionary: what it decodes to is all that matters here)."""
    base, target = image_pair()
    delta = parse_delta(op, payload, 0, len(base))
    images = {Origin.BASE: base, Origin.TARGET: target}
    dictionary = b"".join(Unit(e.origin, e.offset, e.length, e.codec, e.produces).content(images[e.origin])
                          for e in delta.extents)
    loaded = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    decoded = zstandard.ZstdDecompressor(dict_data=loaded, max_window_size=1 << 24).decompress(bytes(delta.frame))
    pieces, parts, at = [], [], 0
    for piece in delta.pieces:
        part = decoded[at : at + piece.in_length]
        at += piece.in_length
        if piece.codec is Codec.DEFLATE_BLOCKS:
            part = prefix + part[4 + 4 * int.from_bytes(part[:4], "little") :]
            pieces.append(Piece(piece.codec, len(part), piece.out_length, piece.level, piece.mem_level))
        else:
            pieces.append(piece)
        parts.append(part)
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(b"".join(parts))
    return replace(op, src_length=0), pack_delta([], pieces, frame)


@pytest.mark.parametrize(("prefix", "message"), [
    ((1 << 20).to_bytes(4, "little"), "block list of 1048576 blocks does not fit"),
    (blocks_prefix([100, 0, 100]), "do not split its .* content bytes into non-empty blocks"),
    (blocks_prefix([10 << 20]), "block lengths .sum 10485760. do not split"),
])
def test_a_hostile_block_list_is_refused(prefix: bytes, message: str) -> None:
    base, _ = image_pair()
    op, payload = with_blocks(*gzip_delta(), prefix)
    with pytest.raises(FormatError, match=message):
        run_op(op, payload, 0, Images(base, image_pair()[1]), len(base))


def test_a_wrong_block_list_fails_the_op() -> None:
    base, target = image_pair()
    op, payload = with_blocks(*gzip_delta(), blocks_prefix([4096]))
    with pytest.raises((FormatError, HashMismatchError), match=r"recompresses to|produced extent"):
        run_op(op, payload, 0, Images(base, target), len(base))


def test_a_deflate_blocks_dictionary_extent_is_refused() -> None:
    base, target = image_pair()
    extent = DictExtent(Origin.BASE, 0, 4096, hashlib.sha256(base[:4096]).digest(), Codec.DEFLATE_BLOCKS, 4096)
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(b"x" * 4096)
    op = Op(OpType.DELTA, 0, 4096, 0, 0, bytes(32), hashlib.sha256(b"x" * 4096).digest(), 0, 4096)
    with pytest.raises(FormatError, match="dictionary extent 0 has an unknown origin, codec or reserved bytes"):
        run_op(op, pack_delta([extent], [], frame), 0, Images(base, target), len(base))


def test_zlib_streams_still_need_no_block_list() -> None:
    content = prose(5, 100 * KiB)
    stream = zlib.compress(content, 9)
    [found] = find_streams(bytes(100) + stream + bytes(100))
    assert found.blocks == ()
