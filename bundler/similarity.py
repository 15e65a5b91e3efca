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
MAX_REGIONS_PER_FEATURE = 8
MIN_SCORE = 2

# Two byte sets of 32 values each (every 8th value, from two offsets), avoiding
# 0x00 and 0xff (runs of either would anchor everywhere): P(anchor) = 1/64 on
# uniform data; text and code land near that too, as both sets hold letters,
# digits and punctuation.
_SET_A = bytes(range(0x03, 0x100, 8))
_SET_B = bytes(range(0x05, 0x100, 8))
_ANCHOR = re.compile(b"[" + re.escape(_SET_A) + b"][" + re.escape(_SET_B) + b"]")

_MULTI = -1  # marks a feature seen in too many regions


def features(data: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(position, feature) for every anchor in data[start:end) whose feature
    fits before `end`."""
    stop = end - FEATURE_LENGTH
    raw = data if isinstance(data, bytes) else bytes(data[start:end])
    base = 0 if isinstance(data, bytes) else start
    lo, hi = (start, end) if isinstance(data, bytes) else (0, end - start)
    for m in _ANCHOR.finditer(raw, lo, hi):
        p = m.start() + base
        if p > stop:
            break
        q = m.start()
        yield p, hash(raw[q : q + FEATURE_LENGTH])


class UnitIndex:
    """feature -> the units (any integer ids: a 64 KiB region, an inflated stream) that hold it."""

    def __init__(self) -> None:
        self.table: dict[int, int | list[int]] = {}

    def add(self, unit: int, data: bytes, start: int, end: int) -> None:
        table = self.table
        for _, feature in features(data, start, end):
            held = table.get(feature)
            if held is None:
                table[feature] = unit
            elif isinstance(held, int):
                if held not in {unit, _MULTI}:
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
    """How many features `content` shares with each unit that `allowed` admits."""
    hits: Counter[int] = Counter()
    for _, feature in features(content, 0, len(content)):
        for unit in index.units(feature):
            if allowed(unit):
                hits[unit] += 1
    return hits
