"""Errors of the media front end.

    OtaError
    +-- MediaError        the stick cannot be used: not mountable, unreadable,
                          nothing installable on it, or its install failed
"""

from __future__ import annotations

from ota_common.errors import OtaError


class MediaError(OtaError):
    """A USB stick (or directory) could not be used; the message says why."""
