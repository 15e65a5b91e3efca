"""Where the blocks of a raw deflate stream (RFC 1951) end, in uncompressed bytes.

GNU gzip ends its deflate blocks where zlib would not (it may end one every
4096 symbols when its estimate says so, and holds up to 32 Ki symbols), but
its matches are those of zlib at the same level and memLevel 9. So zlib
reproduces a GNU gzip member exactly once it is told to end its blocks
where gzip did (bundler.format.deflate.deflate_blocks). This module reads
those boundaries from the original stream: a plain decoder that follows the
Huffman codes and counts bytes, without keeping the output. Host-side only
(the bundler); it runs only on streams zlib already inflated.
"""

from __future__ import annotations

from collections.abc import Callable

_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)
_LBASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163,
          195, 227, 258)
_LEXTRA = (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0)
_DEXTRA = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13)

Table = tuple[list[tuple[int, int] | None], int]  # (symbol, code length) by the next `bits` bits; bits


class _Bad(Exception):
    pass


def _table(lengths: list[int]) -> Table:
    """A lookup table for the canonical Huffman code with these code lengths (RFC 1951 3.2.2)."""
    most = max(lengths, default=0) or 1
    count = [0] * (most + 1)
    for n in lengths:
        count[n] += 1
    count[0] = 0
    code, first = 0, [0] * (most + 2)
    for bits in range(1, most + 1):
        code = (code + count[bits - 1]) << 1
        first[bits] = code
    table: list[tuple[int, int] | None] = [None] * (1 << most)
    for symbol, n in enumerate(lengths):
        if not n:
            continue
        c = first[n]
        first[n] += 1
        if c >= 1 << n:
            raise _Bad("over-subscribed code")
        reversed_code = int(f"{c:0{n}b}"[::-1], 2)  # codes are sent most significant bit first
        for high in range(0, 1 << most, 1 << n):
            table[reversed_code | high] = (symbol, n)
    return table, most


_FIXED = (_table([8] * 144 + [9] * 112 + [7] * 24 + [8] * 8), _table([5] * 30))


def block_ends(stream: bytes | memoryview) -> list[int] | None:
    """The uncompressed offset at which each block of `stream` ends (the last one is the
    stream's length), or None if it is not one valid raw deflate stream."""
    try:
        return _block_ends(bytes(stream) + bytes(8))
    except (_Bad, IndexError, TypeError):
        return None


def _block_ends(data: bytes) -> list[int]:
    pos = 0
    frombytes = int.from_bytes
    limit = 8 * (len(data) - 8)

    def bits(n: int) -> int:
        nonlocal pos
        value = (frombytes(data[pos >> 3 : (pos >> 3) + 4], "little") >> (pos & 7)) & ((1 << n) - 1)
        pos += n
        return value

    def symbol(table: Table) -> int:
        nonlocal pos
        entry = table[0][(frombytes(data[pos >> 3 : (pos >> 3) + 4], "little") >> (pos & 7)) & ((1 << table[1]) - 1)]
        if entry is None:
            raise _Bad("invalid code")
        pos += entry[1]
        return entry[0]

    ends: list[int] = []
    produced = 0
    final = 0
    while not final:
        final, kind = bits(1), bits(2)
        if kind == 0:
            pos = (pos + 7) & ~7
            length = bits(16)
            bits(16)
            pos += 8 * length
            produced += length
        elif kind == 3:
            raise _Bad("reserved block type")
        else:
            literals, distances = _FIXED if kind == 1 else _dynamic(bits, symbol)
            while True:
                s = symbol(literals)
                if s < 256:
                    produced += 1
                elif s == 256:
                    break
                else:
                    s -= 257
                    produced += _LBASE[s] + bits(_LEXTRA[s])
                    bits(_DEXTRA[symbol(distances)])
                if pos > limit:
                    raise _Bad("stream ends inside a block")
        ends.append(produced)
    return ends


def _dynamic(read: Callable[[int], int], sym: Callable[[Table], int]) -> tuple[Table, Table]:
    """The literal/length and distance codes of a dynamic block's header (RFC 1951 3.2.7)."""
    hlit, hdist, hclen = read(5) + 257, read(5) + 1, read(4) + 4
    code_lengths = [0] * 19
    for k in range(hclen):
        code_lengths[_ORDER[k]] = read(3)
    codes = _table(code_lengths)
    lengths: list[int] = []
    while len(lengths) < hlit + hdist:
        s = sym(codes)
        if s < 16:
            lengths.append(s)
        elif s == 16:
            if not lengths:
                raise _Bad("repeat with nothing before")
            lengths += [lengths[-1]] * (3 + read(2))
        elif s == 17:
            lengths += [0] * (3 + read(3))
        else:
            lengths += [0] * (11 + read(7))
    if len(lengths) != hlit + hdist:
        raise _Bad("code lengths overrun")
    return _table(lengths[:hlit]), _table(lengths[hlit:])
