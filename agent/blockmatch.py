"""Finding a bundle's blocks in the slots: the device half of the block index
(bundler.format.blockindex, docs/bundle-format.md section 7.2).

Owns matching: the index's entries (one short hash per 4 KiB block of every
REPLACE op) go into an open-addressing table held in flat arrays, the
candidate slots are read 4 KiB-aligned block by block and hashed, and every
block of the bundle found somewhere gets a location (candidate slot, block
number). A block found only in the target slot is usable only at or after the
start of its own op (ops are written in order, so anything before is
overwritten by then). Nothing here is trusted: `agent.adaptive` reads the
blocks again and checks the op's SHA-256 before anything is written.

Memory, bounded whatever the slot size: the locations (8 bytes a block of the
bundle, at most MAX_INDEX_BLOCKS blocks: 8 MiB); for one window of at most
WINDOW blocks its index entries (1 MiB), the table (2 x WINDOW slots of 12
bytes: 3 MiB) and the chain (0.5 MiB); one READ-byte buffer. The index is
loaded a window at a time (`load`); a bundle with more blocks than WINDOW is
matched in several passes, each reading the candidate slots again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bundler.format.blockindex import BLOCK, op_blocks
from bundler.format.ops import Op

log = logging.getLogger(__name__)

WINDOW = 1 << 17  # blocks matched per pass: the table is 2 x WINDOW slots of 8 + 4 bytes
READ = 1 << 20  # bytes of a slot read at a time
NOWHERE = -1
_EMPTY, _DONE = -1, -2
_SLOT_SHIFT = 48  # location = candidate << 48 | block number
_KEY = struct.Struct("<Q")


def location(candidate: int, block: int) -> int:
    return candidate << _SLOT_SHIFT | block


def split(loc: int) -> tuple[int, int]:
    """(candidate index, byte offset in that slot) of a location."""
    return loc >> _SLOT_SHIFT, (loc & ((1 << _SLOT_SHIFT) - 1)) * BLOCK


def entries(raw: bytes | bytearray | memoryview) -> array[int]:
    """The index region as integers (each entry read little-endian)."""
    keys = array("Q")
    keys.frombytes(bytes(raw))
    if sys.byteorder == "big":
        keys.byteswap()
    return keys


def key(block: bytes | bytearray | memoryview) -> int:
    """The integer of a block's index entry (bundler.format.blockindex.block_hash)."""
    return int(_KEY.unpack_from(hashlib.sha256(block).digest())[0])


@dataclass(frozen=True, slots=True)
class Candidate:
    """A slot that may hold blocks, and whether it is the slot being written."""

    path: Path
    is_target: bool


@dataclass(frozen=True, slots=True)
class Group:
    """The REPLACE blocks of one image: ordinals [first, first + count), searched for in
    `candidates` (indexes into the candidate list), `op_start[k]` the dst_offset of the op
    ordinal first + k belongs to."""

    first: int
    count: int
    candidates: tuple[int, ...]
    op_start: array[int]


def op_starts(ops: Sequence[Op]) -> array[int]:
    """Per block ordinal of `ops`' REPLACE blocks: the dst_offset of its op."""
    starts = array("q")
    for op in ops:
        n = op_blocks(op)
        if n:
            starts.extend(array("q", [op.dst_offset]) * n)
    return starts


class _Table:
    """Open addressing over flat arrays: each distinct key once, with the chain of
    ordinals (window-relative) that share it."""

    def __init__(self, keys: array[int], count: int) -> None:
        size = 1 << max(4, (2 * count - 1).bit_length())
        self.mask = size - 1
        self.keys = array("Q", bytes(8 * size))
        self.heads = array("i", [_EMPTY]) * size
        self.chain = array("i", [_EMPTY]) * count
        self.waiting = 0  # distinct keys not yet found
        for k in range(count):
            h = keys[k]
            at = h & self.mask
            while self.heads[at] != _EMPTY and self.keys[at] != h:
                at = (at + 1) & self.mask
            if self.heads[at] == _EMPTY:
                self.keys[at] = h
                self.waiting += 1
            else:
                self.chain[k] = self.heads[at]
            self.heads[at] = k

    def find(self, h: int) -> int:
        """The table slot holding `h` whose ordinals still wait, else -1."""
        at = h & self.mask
        heads, keys = self.heads, self.keys
        while (head := heads[at]) != _EMPTY:
            if keys[at] == h:
                return at if head != _DONE else -1
            at = (at + 1) & self.mask
        return -1

    def ordinals(self, at: int) -> Iterator[int]:
        k = self.heads[at]
        while k != _EMPTY:
            yield k
            k = self.chain[k]

    def done(self, at: int) -> None:
        self.heads[at] = _DONE
        self.waiting -= 1


def match(
    load: Callable[[int, int], array[int]], blocks: int, groups: Sequence[Group], candidates: Sequence[Candidate]
) -> tuple[array[int], int]:
    """Per block ordinal, where a candidate slot holds it (`location`) or NOWHERE;
    and the bytes of slots read. `load(first, count)` gives the index entries of
    ordinals [first, first + count); it is called in increasing order, each once."""
    locations = array("q", [NOWHERE]) * blocks
    read = 0
    for group in groups:
        for start in range(0, group.count, WINDOW):
            count = min(WINDOW, group.count - start)
            keys = load(group.first + start, count)
            table = _Table(keys, count)
            del keys
            for c in group.candidates:
                if table.waiting == 0:
                    break
                read += _scan(table, candidates[c], c, locations, base=group.first + start,
                              op_start=group.op_start, window_start=start)
            del table
    return locations, read


def _scan(table: _Table, candidate: Candidate, index: int, locations: array[int], *, base: int,
          op_start: array[int], window_start: int) -> int:
    """Read one slot block by block and give every waiting ordinal it holds a location."""
    try:
        fd = os.open(candidate.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        log.info("adaptive download: cannot read %s (%s); not searching it", candidate.path, e.strerror)
        return 0
    buf = bytearray(READ)
    view = memoryview(buf)
    offset = 0
    try:
        while table.waiting:
            try:
                n = os.preadv(fd, [view], offset)
            except OSError as e:
                log.info("adaptive download: reading %s at %d: %s; searched up to there", candidate.path, offset,
                         e.strerror)
                break
            n -= n % BLOCK
            if n <= 0:
                break
            for at in range(0, n, BLOCK):
                slot = table.find(key(view[at : at + BLOCK]))
                if slot < 0:
                    continue
                here = offset + at
                loc = location(index, here // BLOCK)
                waiting = False
                for k in table.ordinals(slot):
                    ordinal = base + k
                    if locations[ordinal] != NOWHERE:
                        continue
                    if candidate.is_target and here < op_start[window_start + k]:
                        waiting = True  # overwritten before its op runs: look further on
                        continue
                    locations[ordinal] = loc
                if not waiting:
                    table.done(slot)
            offset += n
    finally:
        os.close(fd)
        view.release()
    return offset
