"""One strict JSON decoder for every untrusted JSON document the agent reads
over a wire (local API requests, MQTT jobs and reports): a duplicate key, NaN or
Infinity, and an integer longer than `max_digits` are errors, found in one
pass (set lookups, no quadratic scan); fractions are refused where a schema
has only integers. Every failure is a `StrictJSONError` (a ValueError) with a
short message; callers turn it into their own error with their own context.
"""

from __future__ import annotations

import json
from typing import Any

from ota_common.text import clean

DEFAULT_MAX_DIGITS = 20


class StrictJSONError(ValueError):
    """The text is not JSON, or is JSON these rules refuse."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise StrictJSONError(f"key {clean(key, 40)!r} appears twice")
        doc[key] = value
    return doc


def _constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number")


def loads(text: str, *, max_digits: int = DEFAULT_MAX_DIGITS, integers_only: bool = False) -> Any:
    """Decode `text` under the strict rules; raises StrictJSONError saying why not."""

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > max_digits:
            raise StrictJSONError(f"an integer of {len(digits)} digits is longer than the {max_digits} allowed")
        return int(digits)

    def fraction(digits: str) -> float:
        if integers_only:
            raise StrictJSONError(f"{clean(digits, 40)} is not an integer (numbers here are integers)")
        if len(digits) > 4 * max_digits:
            raise StrictJSONError(f"a number of {len(digits)} characters is longer than allowed")
        return float(digits)

    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_int=integer,
                          parse_float=fraction)
    except json.JSONDecodeError as e:
        raise StrictJSONError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise StrictJSONError("nested too deeply") from None
