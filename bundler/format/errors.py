"""Errors of the bundle format, under edge-ota's one error root `OtaError`
(ota_common/errors.py, which every package shares).

    OtaError                      root of every error edge-ota raises on purpose
    +-- FormatError               bytes that are not a well-formed bundle
    |   +-- TruncatedError        the stream ended before a region was complete
    |   +-- BoundsError           a length or count outside its allowed range
    +-- TrustError                signature or hash says "do not trust this"
    |   +-- SignatureError        no trusted key signed exactly these bytes
    |   +-- HashMismatchError     a payload piece or produced extent is not what the manifest pins
    +-- PolicyError               a genuine bundle this device must refuse
    |   (compatible string, security version, expiry; defined in agent.errors)
    +-- HwError                   hardware / bootloader / slot failures (hw.errors)

Errors carry data (region, op index, expected/actual) so the CLI can print one
precise line and tests can assert on fields instead of on prose.
"""

from __future__ import annotations

from ota_common.errors import OtaError


class FormatError(OtaError):
    """The input is not a well-formed bundle."""

    def __init__(self, message: str, *, region: str = "") -> None:
        super().__init__(f"{region}: {message}" if region else message)
        self.region = region


class TruncatedError(FormatError):
    """The stream ended inside a region."""

    def __init__(self, region: str, expected: int, got: int) -> None:
        super().__init__(f"truncated: expected {expected} bytes, got {got}", region=region)
        self.expected = expected
        self.got = got


class BoundsError(FormatError):
    """A length or count field is outside its allowed range."""

    def __init__(self, field: str, value: int, low: int, high: int, *, region: str = "") -> None:
        super().__init__(f"{field}={value} outside [{low}, {high}]", region=region)
        self.field = field
        self.value = value


class TrustError(OtaError):
    """Cryptographic verification failed."""


class SignatureError(TrustError):
    """No trusted key produced a valid signature over the signed bytes."""


class HashMismatchError(TrustError):
    """A hash pinned by the manifest does not match the data."""

    def __init__(self, what: str, expected: str, actual: str, *, op_index: int | None = None) -> None:
        where = f"op {op_index}: " if op_index is not None else ""
        super().__init__(f"{where}{what} hash mismatch: expected {expected[:16]}…, got {actual[:16]}…")
        self.what = what
        self.expected = expected
        self.actual = actual
        self.op_index = op_index
