"""The exact deflate both sides use for deflate-aware DELTA ops (docs/delta.md).

A DELTA op may carry the *uncompressed* content of a zlib or raw-deflate
stream of the target; the device recompresses it with the stdlib's zlib,
`zlib.compressobj(level, zlib.DEFLATED, wbits, mem_level, zlib.Z_DEFAULT_STRATEGY)`,
one `compress()` of the whole content and `flush(Z_FINISH)`. wbits is 15 for a
zlib stream (RFC 1950: header and Adler-32 included) and -15 for raw deflate
(RFC 1951; a gzip member's header and trailer stay raw bytes around it).
The bundler emits such a piece only after this very function reproduced the
original bytes exactly; the op's dst_sha256 still checks the result.

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


_WBITS = {Codec.ZLIB: 15, Codec.DEFLATE: -15}
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
