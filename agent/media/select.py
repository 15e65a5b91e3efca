"""Choosing the bundle to install from a stick: by what its **signed** manifest
says, never by its file name.

Each candidate is opened once (`scan.open_candidate`) and its head (header,
manifest, signatures: at most ~66 KiB) read once into memory and verified with
the device's keyring. The policy then sorts it out: another device's compatible
string, a security version below the committed floor, or an expired bundle is
ignored with that reason; so is one not newer than what the booted slot holds.
Of the rest the newest wins, ordered by (security version, bundle version,
creation time); bundle versions compare part by part, numbers as numbers
("1.10" > "1.9"; a numeric part outranks a word: "1.0" > "factory").

The winner keeps its descriptor and verified head bytes (`Head`): the install
replays those bytes from memory and reads on from the same descriptor, so no
byte is read from the stick twice (RAUC CVE-2020-25860 was a verify-then-reopen).
Losers' descriptors are closed as soon as they lose: at most two are open.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from agent import policy
from agent.errors import PolicyError
from agent.media.scan import open_candidate, show
from agent.state import SlotRecord, Trial
from bundler.format.reader import BundleReader
from bundler.format.signing import Keyring, VerifiedBundle, verify
from ota_common.errors import OtaError
from ota_common.media import Ignored
from ota_common.text import clean

_PARTS = re.compile(r"\d+|[^\W\d_]+")


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key of a bundle version: its runs of digits (as numbers) and of letters."""
    return tuple((1, int(p), "") if p.isdigit() else (0, 0, p.lower()) for p in _PARTS.findall(version[:128]))


@dataclass(slots=True)
class Head:
    """A candidate whose signed head was read and verified; owns `fd`."""

    path: str
    fd: int
    size: int
    raw: bytes  # the exact head bytes read from `fd`, already verified
    bundle: VerifiedBundle

    @property
    def key(self) -> tuple[int, tuple[tuple[int, int, str], ...], datetime]:
        m = self.bundle.manifest
        return m.security_version, version_key(m.bundle_version), m.created

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class Selection:
    chosen: Head | None = None
    ignored: list[Ignored] = field(default_factory=list)
    invalid: int = 0  # candidates refused as unreadable, malformed or untrusted

    def close(self) -> None:
        if self.chosen is not None:
            self.chosen.close()


class _Recorder:
    """Reads a descriptor and keeps what it read (only the head goes through it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()

    def read(self, n: int, /) -> bytes:
        chunk = os.read(self.fd, n)
        self.data += chunk
        return chunk


def read_head(root_fd: int, parts: tuple[str, ...], keyring: Keyring) -> Head:
    """Open the candidate and read and verify its head. OtaError/OSError on failure."""
    fd, size = open_candidate(root_fd, parts)
    try:
        recorder = _Recorder(fd)
        unverified = BundleReader(recorder).read_head()
        bundle = verify(unverified, keyring)
        return Head(show(parts), fd, size, bytes(recorder.data), bundle)
    except BaseException:
        os.close(fd)
        raise


def select(
    root_fd: int,
    candidates: Sequence[tuple[str, ...]],
    *,
    keyring: Keyring,
    compatible: str,
    security_floor: int,
    now: datetime,
    installed: SlotRecord | None,
    pending: Trial | None = None,
    tick: Callable[[int, int], None] | None = None,
) -> Selection:
    """The newest installable candidate and every other one with its reason. It
    must be newer than what the booted slot holds (`installed`) and than an update
    already pending in the other slot (`pending`), which it would replace."""
    out = Selection()
    current: list[tuple[tuple[int, tuple[tuple[int, int, str], ...]], str]] = []
    if installed is not None and installed.version is not None:
        current.append(((installed.security_version or 0, version_key(installed.version)),
                        f"the installed {installed.version}"))
    if pending is not None:
        current.append(((pending.security_version, version_key(pending.bundle_version)),
                        f"{pending.bundle_version}, pending in slot {pending.slot}"))
    try:
        for index, parts in enumerate(candidates):
            if tick:
                tick(index, len(candidates))  # may raise CanceledError: `out` is closed below
            name = show(parts)
            try:
                head = read_head(root_fd, parts, keyring)
            except OSError as e:
                out.invalid += 1
                out.ignored.append(Ignored(name, f"unreadable: {clean(e.strerror or e, 120)}"))
                continue
            except OtaError as e:
                out.invalid += 1
                out.ignored.append(Ignored(name, f"not a valid bundle for this device: {e}"))
                continue
            m = head.bundle.manifest
            why = _refusal(head, compatible, security_floor, now)
            for key, what in current:
                if why is None and head.key[:2] <= key:
                    why = f"version {m.bundle_version} is not newer than {what}"
            best = out.chosen
            if why is None and best is not None and head.key <= best.key:
                newest = best.bundle.manifest.bundle_version
                why = f"version {m.bundle_version} is not newer than {newest} ({best.path})"
            if why is not None:
                head.close()
                out.ignored.append(Ignored(name, why))
                continue
            if best is not None:
                out.ignored.append(Ignored(best.path, f"version {best.bundle.manifest.bundle_version} is older "
                                                      f"than {m.bundle_version} ({name})"))
                best.close()
            out.chosen = head
        if tick:
            tick(len(candidates), len(candidates))
        return out
    except BaseException:
        out.close()
        raise


def _refusal(head: Head, compatible: str, floor: int, now: datetime) -> str | None:
    m = head.bundle.manifest
    if m.compatible != compatible:
        return f"for another device: compatible {m.compatible!r}, this device is {compatible!r}"
    try:
        policy.check(head.bundle, compatible=compatible, security_floor=floor, now=now)
    except PolicyError as e:
        return f"refused: {e}"
    return None
