"""The exact deflate both sides use for deflate-aware DELTA ops (docs/delta.md).

A DELTA op may carry the *uncompressed* content of a zlib or raw-deflate
stream of the target; the device recompresses it with the stdlib's zlib,
`zlib.compressobj(level, zlib.DEFLATED, wbits, mem_level, zlib.Z_DEFAULT_STRATEGY)`,
one `compress()` of the whole content and `flush(Z_FINISH)`. wbits is 15 for a
zlib stream (RFC 1950: header and Adler-32 included) and -15 for raw deflate
(RFC 1951; a gzip member's header and trailer stay raw bytes around it).
The bundler emits such a piece only after this very function reproduced the
original bytes exactly; the op's dst_sha256 still checks the result.

A DEFLATE_BLOCKS piece is raw deflate whose block boundaries the bundler
copied from the original stream (GNU gzip ends blocks where zlib would not):
its decoded bytes are a u32 block count n, n u32 block lengths (uncompressed
bytes, each >= 1), then the content; the device feeds the content block by
block, `flush(Z_BLOCK)` after each listed block, and the rest with
`flush(Z_FINISH)` (`deflate_blocks`). With the blocks ending where GNU gzip
ended them, zlib's matches and Huffman codes come out as GNU gzip's.

Dictionary extents may likewise be inflated streams of the base: `inflate`
must consume exactly the extent and yield exactly the declared length.
"""

from __future__ import annotations

import enum
import zlib

from bundler.format.errors import FormatError


class Codec(enum.IntEnum):
    RAW = 0
    ZLIB = 1  # RFC 1950 stream, wbits 15
    DEFLATE = 2  # RFC 1951 raw deflate, wbits -15
    X86 = 3  # not a compressor: the x86 branch filter of bundler.format.x86 (same length)
    DEFLATE_BLOCKS = 4  # output pieces only: raw deflate with listed block boundaries


DEFLATE_CODECS = frozenset({Codec.ZLIB, Codec.DEFLATE})  # what a dictionary extent may inflate
RECOMPRESSED = frozenset({Codec.ZLIB, Codec.DEFLATE, Codec.DEFLATE_BLOCKS})  # pieces with a level


_WBITS = {Codec.ZLIB: 15, Codec.DEFLATE: -15, Codec.DEFLATE_BLOCKS: -15}
LEVELS = range(1, 10)
MEM_LEVELS = range(1, 10)


def deflate(data: bytes | bytearray | memoryview, codec: Codec, level: int, mem_level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, _WBITS[codec], mem_level, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(data) + c.flush(zlib.Z_FINISH)


def inflate(data: bytes | bytearray | memoryview, codec: Codec, out_length: int, what: str) -> bytes:
    """The content of exactly one stream that is all of `data`, exactly `out_length` bytes."""
    d = zlib.decompressobj(_WBITS[codec])
    try:
        out = d.decompress(data, out_length + 1)
    except zlib.error as e:
        raise FormatError(f"{what}: not a {codec.name.lower()} stream: {e}", region="payload") from None
    if len(out) != out_length or not d.eof or d.unused_data or d.unconsumed_tail:
        raise FormatError(
            f"{what}: inflates to {len(out)}{'+' if not d.eof else ''} bytes, not exactly {out_length} "
            "with the stream ending at the extent's end", region="payload",
        )
    return out


def blocks_prefix(blocks: tuple[int, ...] | list[int]) -> bytes:
    """What precedes a DEFLATE_BLOCKS piece's content in its decoded bytes."""
    return len(blocks).to_bytes(4, "little") + b"".join(n.to_bytes(4, "little") for n in blocks)


def split_blocks(decoded: bytes | bytearray | memoryview, what: str) -> tuple[list[int], memoryview]:
    """(block lengths, content) of a DEFLATE_BLOCKS piece's decoded bytes, checked: the
    list fits, every listed block holds at least one byte and they end inside the content."""
    view = memoryview(decoded).cast("B")
    count = int.from_bytes(view[:4], "little") if len(view) >= 4 else -1
    if count < 0 or 4 + 4 * count > len(view):
        raise FormatError(f"{what}: block list of {count} blocks does not fit its {len(view)} bytes",
                          region="payload")
    lengths = [int.from_bytes(view[4 + 4 * k : 8 + 4 * k], "little") for k in range(count)]
    content = view[4 + 4 * count :]
    if any(n < 1 for n in lengths) or sum(lengths) > len(content):
        raise FormatError(f"{what}: block lengths (sum {sum(lengths)}) do not split its "
                          f"{len(content)} content bytes into non-empty blocks", region="payload")
    return lengths, content


def deflate_blocks(content: bytes | bytearray | memoryview, blocks: list[int], level: int, mem_level: int) -> bytes:
    """Raw deflate of `content`, a block ended (Z_BLOCK) after each of `blocks` bytes."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15, mem_level, zlib.Z_DEFAULT_STRATEGY)
    view = memoryview(content).cast("B")
    out: list[bytes] = []
    at = 0
    for n in blocks:
        out.append(c.compress(view[at : at + n]))
        out.append(c.flush(zlib.Z_BLOCK))
        at += n
    out.append(c.compress(view[at:]))
    out.append(c.flush(zlib.Z_FINISH))
    return b"".join(out)
