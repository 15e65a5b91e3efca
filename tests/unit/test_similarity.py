"""The similarity features (bundler/similarity.py): anchors are every position
whose two bytes fall into the two byte sets, found through the byte map in one
literal search; the features survive a shift of the data by any number of bytes."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bundler import similarity

_CLASSES = re.compile(b"[" + re.escape(similarity._SET_A) + b"][" + re.escape(similarity._SET_B) + b"]")


def by_definition(data: bytes, start: int, end: int) -> list[tuple[int, int]]:
    last = end - similarity.FEATURE_LENGTH
    return [(m.start(), hash(data[m.start() : m.start() + similarity.FEATURE_LENGTH]))
            for m in _CLASSES.finditer(data, start, end) if m.start() <= last]


# Mostly bytes of the two sets, so anchors crowd, follow each other and straddle the ends.
crowded = st.binary(min_size=100, max_size=2000).map(lambda raw: bytes(similarity._SET_A[b % 32] if b < 100 else
                                                         similarity._SET_B[b % 32] if b < 200 else b for b in raw))


@given(crowded, st.integers(0, 2000), st.integers(0, 2000))
@settings(max_examples=300, deadline=None)
def test_the_anchors_are_the_positions_of_the_two_byte_sets(data: bytes, a: int, b: int) -> None:
    start, end = sorted((a % (len(data) + 1), b % (len(data) + 1)))
    expected = by_definition(data, start, end)
    if end - start > 300:
        assert expected, "crowded data of this length has anchors"
    assert list(similarity.features(data, start, end)) == expected
    assert list(similarity.features(memoryview(data), start, end)) == expected
    assert similarity.feature_hashes(data, start, end) == [f for _, f in expected]


@given(st.binary(min_size=200, max_size=3000), st.binary(max_size=100))
@settings(max_examples=100, deadline=None)
def test_features_survive_a_shift(data: bytes, prefix: bytes) -> None:
    moved = prefix + data
    assert similarity.feature_hashes(moved, len(prefix), len(moved)) == similarity.feature_hashes(data, 0, len(data))
