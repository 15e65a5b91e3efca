"""`Retry-After` (RFC 9110 section 10.2.3), shared by the device's download
client and the build host's registry client: the seconds a 429 or 503 asks
the client to wait, given as delta-seconds or as an HTTP-date."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER_TEXT = 64


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from `now` (a date in the past: 0); None when absent or not one of the two forms."""
    text = (value or "").strip()
    if not text or len(text) > MAX_RETRY_AFTER_TEXT:
        return None
    if text.isascii() and text.isdigit():
        return float(min(int(text), 1 << 31))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # an HTTP-date is always GMT
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)
