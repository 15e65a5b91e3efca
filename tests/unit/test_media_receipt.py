"""The receipt schema both sides share (ota_common.media) and the bundle version
order the agent chooses by: a receipt survives encode/decode, its text and file
name are safe for a FAT stick, a hostile receipt file is refused with a reason,
and versions order part by part, numbers as numbers."""

from __future__ import annotations

import json

import pytest

from agent.media.select import version_key
from ota_common.media import MAX_IGNORED, MAX_RECEIPT, Ignored, Outcome, Receipt


def receipt(**changes: object) -> Receipt:
    values: dict[str, object] = {"device": "dev-1", "result": Outcome.INSTALLED, "reason": "installed",
                                 "time": "2026-12-01T10:00:00Z", "txn": "abc123", "old_version": "1.0",
                                 "new_version": "2.0", "bundle": "edge-ota/v2.otab", "slot": "B",
                                 "ignored": (Ignored("x.otab", "for another device"),)}
    values.update(changes)
    return Receipt(**values)  # type: ignore[arg-type]


def test_a_receipt_round_trips_and_names_a_fat_safe_file() -> None:
    r = receipt(device="dev/1:x")
    assert Receipt.decode(r.encode()) == r
    assert r.file_stem() == "dev_1_x-20261201T100000Z-abc123"
    assert r.text().splitlines()[0] == "edge-ota: installed"
    assert "ignored:     x.otab: for another device" in r.text()


def test_foreign_text_in_a_receipt_is_one_bounded_line() -> None:
    r = receipt(reason="a\nb" + "x" * 1000, ignored=tuple(Ignored(f"{i}", "r") for i in range(100)))
    assert "\n" not in r.reason
    assert len(r.reason) <= 300
    assert len(r.ignored) == MAX_IGNORED


@pytest.mark.parametrize(("raw", "problem"), [
    (b"\xff", "not UTF-8"),
    (b"[]", "not an edge-ota-media-receipt/1 document"),
    (b'{"schema": "edge-ota-media-receipt/1", "schema": "x"}', "appears twice"),
    (json.dumps({**receipt().to_json(), "result": "exploded"}).encode(), "unknown result"),
    (json.dumps({**receipt().to_json(), "device": 7}).encode(), "'device' is missing or not a string"),
    (json.dumps({**receipt().to_json(), "ignored": [1]}).encode(), "not {file, reason}"),
    (b" " * (MAX_RECEIPT + 1), "larger than"),
])
def test_a_hostile_receipt_file_is_refused_with_its_reason(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Receipt.decode(raw)


def test_bundle_versions_order_part_by_part_numbers_as_numbers() -> None:
    ordered = ["factory", "0.9", "1.0", "1.0.1", "1.9", "1.10", "2.0", "10.0"]
    assert sorted(ordered, key=version_key) == ordered
    assert version_key("2.0") == version_key("2-0")
