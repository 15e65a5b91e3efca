"""Making foreign text safe to log, print and persist.

Every string that came from outside (a server's error, a manifest value, a job
field, a config value, a file name) passes through `clean()` before it reaches
a log line, a terminal, `state.json` or the outbox: the result is one line
(control, format and line/paragraph-separator characters escaped, so a value
cannot plant a fake log line or move the cursor), at most `limit` characters
("…" marks a cut), and computing it costs time linear in `limit`, not in the
input's length.

Lives beside the error root because `OtaError` applies it to every message.
"""

from __future__ import annotations

import unicodedata

DEFAULT_LIMIT = 300
ERROR_LIMIT = 600
ELLIPSIS = "…"
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named if ch != "\\" else ch  # a backslash is safe on its own; keep paths readable
    if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return ch


def clean(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` as a single bounded line: `str(value)` for non-strings, bytes decoded
    as UTF-8 with replacement, unsafe characters escaped, cut to `limit` characters."""
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value[: limit * 4]).decode("utf-8", "replace")
    else:
        text = value if isinstance(value, str) else str(value)
    pieces = [_escape(ch) for ch in text[: limit + 1]]
    if len(text) <= limit and sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    out: list[str] = []
    room = max(limit - len(ELLIPSIS), 0)
    for piece in pieces:
        if len(piece) > room:
            break
        out.append(piece)
        room -= len(piece)
    return "".join(out) + ELLIPSIS
