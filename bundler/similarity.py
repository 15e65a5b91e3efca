"""Content similarity between images: which 64 KiB regions of the base (or of
the target already written) look like a given stretch of the target, so a
DELTA op can take them as its dictionary wherever the data moved to.

Features are content-defined, so they survive shifts by any number of bytes:
an anchor is every position whose two bytes fall into two fixed byte sets
(about one position in 64 on uniform data, found by the regex engine in C),
and the feature is the hash of the 32 bytes that start there. An index maps
each feature to the units holding it (64 KiB regions of raw bytes, or the
inflated content of one compressed stream); a feature found in more than
`MAX_REGIONS_PER_FEATURE` units says nothing about where a stretch came
from and is dropped. A stretch scores each unit by the features they share;
the planner takes units scoring at least `MIN_SCORE`, best first, until the
dictionary budget is full.

Host-side only (the bundler); the device never searches.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator

REGION_SHIFT = 16  # 64 KiB regions
REGION = 1 << REGION_SHIFT
FEATURE_LENGTH = 32
MAX_REGIONS_PER_FEATURE = 16
MIN_SCORE = 2

# Two byte sets of 32 values each (every 8th value, from two offsets), avoiding
# 0x00 and 0xff (runs of either would anchor everywhere): P(anchor) = 1/64 on
# uniform data; text and code land near that too, as both sets hold letters,
# digits and punctuation.
_SET_A = bytes(range(0x03, 0x100, 8))
_SET_B = bytes(range(0x05, 0x100, 8))
# Anchors are found as the literal b"ab" in the bytes mapped through _MARKS (set A to
# "a", set B to "b", the rest to "."): the same positions as the character classes
# `[A][B]` (the sets are disjoint, so no two anchors overlap), in a third of the time.
_MARKS = bytes(0x61 if b in _SET_A else 0x62 if b in _SET_B else 0x2E for b in range(256))
_ANCHOR = re.compile(b"ab")

_MULTI = -1  # marks a feature seen in too many regions


def _anchors(data: bytes | memoryview, start: int, end: int) -> tuple[bytes, list[int]]:
    """(data[start:end) as bytes, the anchors in it whose feature fits before its end,
    as offsets into it)."""
    raw = bytes(data[start:end])
    last = len(raw) - FEATURE_LENGTH
    return raw, [q for q in [m.start() for m in _ANCHOR.finditer(raw.translate(_MARKS))] if q <= last]


def features(data: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(position, feature) for every anchor in data[start:end) whose feature
    fits before `end`."""
    raw, anchors = _anchors(data, start, end)
    for q in anchors:
        yield q + start, hash(raw[q : q + FEATURE_LENGTH])


def feature_hashes(data: bytes | memoryview, start: int, end: int) -> list[int]:
    """The features of `features`, without their positions, in order: one list made
    by comprehensions (the index is built and searched over millions of them)."""
    raw, anchors = _anchors(data, start, end)
    n = FEATURE_LENGTH
    return [hash(raw[q : q + n]) for q in anchors]


class UnitIndex:
    """feature -> the units (any integer ids: a 64 KiB region, an inflated stream) that hold it."""

    def __init__(self) -> None:
        self.table: dict[int, int | list[int]] = {}

    def add(self, unit: int, data: bytes, start: int, end: int) -> None:
        """Index the features of data[start:end) under `unit`. A feature new to the
        index maps to the unit; one held by other units gets it added (by the first
        unit that added it, in the order units were added), until it is held by more
        than MAX_REGIONS_PER_FEATURE and says nothing."""
        table = self.table
        fresh = set(feature_hashes(data, start, end))
        known = fresh & table.keys()
        fresh -= known
        table.update(dict.fromkeys(fresh, unit))
        for feature in known:
            held = table[feature]
            if isinstance(held, int):
                if held not in (unit, _MULTI):
                    table[feature] = [held, unit]
            elif unit not in held:
                if len(held) >= MAX_REGIONS_PER_FEATURE:
                    table[feature] = _MULTI
                else:
                    held.append(unit)

    def units(self, feature: int) -> list[int]:
        held = self.table.get(feature)
        if held is None or held == _MULTI:
            return []
        return [held] if isinstance(held, int) else held


def score(content: bytes, index: UnitIndex, allowed: Callable[[int], bool]) -> Counter[int]:
    """How many features `content` shares with each unit that `allowed` admits (a
    feature `content` holds twice counts twice)."""
    found: list[int] = []
    get = index.table.get
    for feature in feature_hashes(content, 0, len(content)):
        held = get(feature)
        if held is None or held == _MULTI:
            continue
        if isinstance(held, int):
            found.append(held)
        else:
            found += held
    counts = Counter(found)
    return Counter({unit: n for unit, n in counts.items() if allowed(unit)})
