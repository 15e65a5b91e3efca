"""Install policy: whether a *verified* bundle may go on this device.

A pure function over the verified manifest and the device's facts: compatible
string (exact match), security version (no downgrade below the committed floor
unless `allow_downgrade`, spelled the dangerous way round and off by default)
and expiry against an injected clock. A clock behind the bundle's signed
creation time (an unset RTC boots at 1970) cannot be trusted for expiry: the
check then uses the creation time as the earliest possible "now" and logs that
it did, so an expired bundle is not accepted merely because the clock is unset.
"""

from __future__ import annotations

import logging
from datetime import datetime

from agent.errors import DowngradeError, ExpiredError, IncompatibleError
from agent.events import iso
from bundler.format.signing import VerifiedBundle

log = logging.getLogger(__name__)


def check(
    bundle: VerifiedBundle, *, compatible: str, security_floor: int, now: datetime, allow_downgrade: bool = False
) -> None:
    m = bundle.manifest
    if m.compatible != compatible:
        raise IncompatibleError(m.compatible, compatible)
    if m.security_version < security_floor and not allow_downgrade:
        raise DowngradeError(m.security_version, security_floor)
    if m.expires is not None and now < m.created:
        log.warning("the clock (%s) is behind the bundle's signed creation time (%s): RTC unset? "
                    "expiry checked against the creation time instead", iso(now), iso(m.created))
        now = m.created
    if m.expires is not None and m.expires <= now:
        raise ExpiredError(iso(m.expires), iso(now))
