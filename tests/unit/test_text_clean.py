"""Foreign text is made one bounded line before it is logged, shown or persisted."""

from __future__ import annotations

import time
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bundler.format.errors import FormatError
from ota_common.errors import OtaError
from ota_common.strictjson import StrictJSONError, loads
from ota_common.text import ERROR_LIMIT, clean


def test_newlines_and_terminal_escapes_are_escaped_so_no_fake_log_line_can_be_planted() -> None:
    out = clean("ok\nota-agent: install: ok\r\x1b[2K\u2028\u202e")
    assert "\n" not in out
    assert "\r" not in out
    assert "\x1b" not in out
    assert out == "ok\\nota-agent: install: ok\\r\\x1b[2K\\u2028\\u202e"


def test_long_text_is_cut_with_an_ellipsis_and_never_splits_an_escape() -> None:
    assert clean("x" * 10_000, 20) == "x" * 19 + "…"
    assert clean("a\nb", 3) == "a…"
    assert clean("abc", 3) == "abc"


def test_bytes_and_other_objects_are_accepted() -> None:
    assert clean(b"\xffabc") == "\ufffdabc"
    assert clean(12) == "12"


def test_cost_is_bounded_by_the_limit_not_by_the_input() -> None:
    huge = "\n" * (50 << 20)
    start = time.monotonic()
    assert len(clean(huge)) <= 300
    assert time.monotonic() - start < 1.0


@given(st.text(), st.integers(min_value=1, max_value=400))
def test_any_text_becomes_one_line_within_the_limit(text: str, limit: int) -> None:
    out = clean(text, limit)
    assert len(out) <= limit
    assert not [c for c in out if unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}]
    assert len(out.splitlines()) <= 1


def test_every_ota_error_message_is_bounded_and_single_line() -> None:
    e = FormatError("bad value " + "y\n" * 1_000_000, region="manifest")
    assert len(str(e)) <= ERROR_LIMIT
    assert "\n" not in str(e)
    assert str(OtaError("plain")) == "plain"


def test_the_strict_json_decoder_refuses_duplicates_constants_huge_integers_and_deep_nesting() -> None:
    assert loads('{"a": [1, 2.5]}') == {"a": [1, 2.5]}
    for text, message in [('{"a": 1, "a": 2}', "appears twice"), ("NaN", "not a JSON number"),
                          ("1" * 30, "digits"), ("[" * 100_000, "nested too deeply"), ("{", "line 1")]:
        with pytest.raises(StrictJSONError, match=message):
            loads(text)
    with pytest.raises(StrictJSONError, match="not an integer"):
        loads("1.5", integers_only=True)
