"""The agent's log lines: one `logging.Formatter` that makes every formatted
record one bounded line.

Events are cleaned when they are built, but a log call can still carry foreign
text in a `%`-argument (a server's header, a file name, an exception). The
formatter cleans the whole formatted line with `ota_common.text.clean`, so
no record, whatever its arguments, can break a line, move the cursor or plant
a line that looks like another log record. A traceback (only logged with -v)
stays on the same line with its line breaks escaped.
"""

from __future__ import annotations

import logging

from ota_common.text import ERROR_LIMIT, clean

LINE_LIMIT = ERROR_LIMIT  # room for an event line: kind, version, slot and a 300-character reason
TRACEBACK_LIMIT = 8000


class CleanFormatter(logging.Formatter):
    def __init__(self, fmt: str, *, limit: int = LINE_LIMIT) -> None:
        super().__init__(fmt)
        self.limit = limit

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        limit = TRACEBACK_LIMIT if record.exc_info or record.stack_info else self.limit
        return clean(text, limit)


def use_clean_lines(fmt: str, logger: logging.Logger | None = None) -> None:
    """Put a `CleanFormatter(fmt)` on every handler of `logger` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.setFormatter(CleanFormatter(fmt))
