"""The x86 branch filter both sides use for X86 dictionary extents and output
pieces of DELTA ops (docs/delta.md, docs/bundle-format.md section 7.1).

A rebuilt executable moves its code: every relative CALL (E8) and JMP (E9)
whose target lies across a moved part changes its 32-bit displacement, so
a byte delta against the old build finds short matches only. Rewriting each
displacement as the absolute target (displacement plus the position after
the instruction) makes those instructions equal again wherever the target did
not move. The same idea as the BCJ filters of xz and 7-Zip, but our own,
written down here so that the device needs nothing beyond the stdlib:

- an instruction is any 5 bytes E8/E9, d0, d1, d2, d3 where d3 is 0x00 or 0xFF
  (a displacement within +-16 MiB), found left to right without overlap
  (the next search starts after the 5 bytes);
- `encode` replaces the displacement d (little-endian, signed) with
  (d + p) wrapped into [-2^24, 2^24), where p = `start` + position + 5;
  `decode` subtracts p the same way;
- an instruction is left as it is when one of the (up to 3) bytes between
  the previous instruction found and it is E8 or E9: that opcode's own d3
  lies inside this displacement, and rewriting it could make `decode` see
  an instruction there that `encode` did not.
The wrap keeps d3 0x00 or 0xFF and only displacement bytes change, so `decode`
finds the instructions `encode` rewrote at the same positions and makes the
same choices: `decode(encode(x), s) == x` for every x and s (the bundler
still checks it, and the device checks the produced extent's SHA-256 as for
every op).

`start` is where the data sits in its image (mod 2^32 in the records); a
dictionary extent of the base is encoded with a `start` chosen so that its
positions line up with the target's (the bundler measures the displacement
from shared content).
"""

from __future__ import annotations

import re

from bundler.format.ops import Buffer

_INSN = re.compile(rb"[\xe8\xe9][\x00-\xff]{3}[\x00\xff]", re.DOTALL)
_WRAP = 1 << 25
_HALF = 1 << 24
START_MOD = 1 << 32  # starts are stored as u32; only start mod 2^25 matters


def _apply_into(buf: bytearray | memoryview, start: int, sign: int) -> None:
    """Rewrite `buf` in place: each displacement is changed after the search passed it, and
    what the search and the E8/E9 check read next has not been changed yet."""
    view = memoryview(buf).cast("B")
    base = start + 5
    frombytes = int.from_bytes
    done = 0  # end of the last instruction found
    for m in _INSN.finditer(view):
        k = m.start()
        before = view[max(done, k - 3) : k]
        done = k + 5
        if 0xE8 in before or 0xE9 in before:
            continue  # rewriting it could change what an opcode just before it sees as its d3
        d = frombytes(view[k + 1 : k + 5], "little", signed=True)
        d = (d + sign * (base + k) + _HALF) % _WRAP - _HALF
        view[k + 1 : k + 5] = d.to_bytes(4, "little", signed=True)


def encode_into(buf: bytearray | memoryview, start: int) -> None:
    """`encode` in place (a dictionary extent is filtered where it was read)."""
    _apply_into(buf, start, 1)


def encode(data: Buffer, start: int) -> bytearray:
    """`data` with every branch displacement made absolute (positions from `start`)."""
    out = bytearray(data)
    _apply_into(out, start, 1)
    return out


def decode(data: Buffer, start: int) -> bytearray:
    """The inverse of `encode` with the same `start`."""
    out = bytearray(data)
    _apply_into(out, start, -1)
    return out


def density(data: Buffer) -> float:
    """Share of positions that start an instruction `encode` may rewrite (x86 code: ~1%)."""
    return len(_INSN.findall(data)) / max(1, len(data))
