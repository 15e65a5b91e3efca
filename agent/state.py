"""The agent's persistent state (`STATE_DIR/state.json`), replaced atomically,
and the anti-rollback floor's own copy (`STATE_DIR/security-floor`).

Owns: the committed security version floor, what is installed in each slot,
the pending trial (which slot, which bundle, and why it failed if it did), and
the last result. Does not own boot counting, which lives in the bootloader.

Bounded by construction: every string in a record is cleaned (one line,
`ota_common.text.clean`) to its field limit when the record is built,
from code or from the file; integers are range-checked; at most `MAX_SLOTS`
slot records. So the encoded state can never exceed `STATE_BOUND` bytes
(about 115 KiB: every field at its limit in 4-byte characters, the last result
listing its most /etc conflicts; held by a test),
far below `MAX_STATE`, the reader's limit; `save` checks the size anyway.

Never a lock-out: a `state.json` that cannot be read or parsed (too big, not
JSON, a field of the wrong type, a symlink or FIFO) is set aside as
`state.json.corrupt-<UTC time>` (never deleted), the sections that still
parse are kept (slot records, trial, last result, each on its own), the
recovered state is saved at once, and the agent says so once: a warning and a
`state: set-aside` outbox event. Only a file the agent may not read at all
(permission denied: the wrong user) is an error.

The floor never drops because `state.json` was lost: `security-floor` holds it
too, replaced atomically (before `state.json`) whenever a save raises it, and a
load takes the highest of the two (and of the floor readable from the start of
a damaged `state.json`). If neither is readable the floor is reset to 0 and the
agent says so loudly (error log and a `state: floor-lost` event): anti-rollback
protection is off until the next commit raises the floor again, so an operator
must check what the device runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, InstallError, LockBusyError
from agent.events import NAME_LIMIT, REASON_LIMIT, Event, EventType, Result, clean_or_none, iso, utcnow
from agent.outbox import EventLog
from agent.storefile import describe_os_error, ensure_dir, flocked, read_bounded, set_aside
from bundler.format.manifest import HEX64, NAME
from ota_common.fsutil import atomic_write, make_dirs, open_regular
from ota_common.text import clean

log = logging.getLogger(__name__)

MAX_STATE = 1 << 20
STATE_BOUND = 120 * 1024  # the most the encoded state can reach (test_state_is_bounded_by_construction)
MAX_SLOTS = 16
MAX_SECURITY_VERSION = (1 << 63) - 1
TIME_LIMIT = 64
FLOOR_FILE = "security-floor"
LOCK_FILE = "state.lock"
_FLOOR_AT_START = re.compile(rb'\A\s*\{\s*"committed_security_version"\s*:\s*(\d{1,19})\s*[,}]')


def _security_version(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SECURITY_VERSION:
        raise ValueError(f"{what} is not an integer in 0..{MAX_SECURITY_VERSION}")
    return value


def _optional_str(doc: Mapping[str, Any], key: str, what: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{what}.{key} is not a string")
    return value


def _images(value: object, what: str) -> dict[str, str] | None:
    """slot class -> SHA-256 of the image written there; at most MAX_SLOTS entries."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) > MAX_SLOTS:
        raise ValueError(f"{what}.images is not an object of at most {MAX_SLOTS} entries")
    entries = value.items()
    if not all(isinstance(k, str) and NAME.match(k) and isinstance(v, str) and HEX64.match(v) for k, v in entries):
        raise ValueError(f"{what}.images maps something other than a slot class name to a SHA-256 hex digest")
    return dict(value)


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} is not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class SlotRecord:
    version: str | None = None
    sha256: str | None = None
    security_version: int | None = None
    installed: str | None = None  # ISO time
    images: dict[str, str] | None = None  # slot class -> SHA-256 of every image written (None: older record)

    def __post_init__(self) -> None:
        object.__setattr__(self, "version", clean_or_none(self.version, NAME_LIMIT))
        object.__setattr__(self, "sha256", clean_or_none(self.sha256, NAME_LIMIT))
        object.__setattr__(self, "installed", clean_or_none(self.installed, TIME_LIMIT))
        object.__setattr__(self, "images", _images(self.images, "slot"))
        if self.security_version is not None:
            _security_version(self.security_version, "security_version")

    @classmethod
    def from_json(cls, doc: object, what: str) -> SlotRecord:
        d = _mapping(doc, what)
        sv = d.get("security_version")
        return cls(
            version=_optional_str(d, "version", what),
            sha256=_optional_str(d, "sha256", what),
            security_version=None if sv is None else _security_version(sv, f"{what}.security_version"),
            installed=_optional_str(d, "installed", what),
            images=_images(d.get("images"), what),
        )


@dataclass(frozen=True, slots=True)
class Trial:
    """An update in flight: written while installing (``installed`` False), made
    complete once the slot verified and the bootloader was told to try it, and
    cleared by boot-check at commit or rollback. It only ever describes what its
    slot holds (or is being written with, while the slot is marked bad);
    ``failure`` and ``cancelled`` are verdicts saved before the bootloader acts
    on them, so a power cut in between cannot lose or change them."""

    slot: str
    txn: str
    bundle_version: str
    security_version: int
    sha256: str | None = None
    installed: bool = False
    failure: str | None = None  # set when boot-check gave up on it
    images: dict[str, str] | None = None  # slot class -> SHA-256, every image of the bundle
    cancelled: str | None = None  # set when a later install replaced it before it was tried

    def __post_init__(self) -> None:
        for name in ("slot", "txn", "bundle_version"):
            object.__setattr__(self, name, clean(getattr(self, name), NAME_LIMIT))
        object.__setattr__(self, "sha256", clean_or_none(self.sha256, NAME_LIMIT))
        object.__setattr__(self, "failure", clean_or_none(self.failure, REASON_LIMIT))
        object.__setattr__(self, "cancelled", clean_or_none(self.cancelled, REASON_LIMIT))
        object.__setattr__(self, "installed", bool(self.installed))
        object.__setattr__(self, "images", _images(self.images, "trial"))
        _security_version(self.security_version, "trial.security_version")

    @classmethod
    def from_json(cls, doc: object) -> Trial:
        d = _mapping(doc, "trial")
        required = {k: d.get(k) for k in ("slot", "txn", "bundle_version")}
        for key, value in required.items():
            if not isinstance(value, str):
                raise ValueError(f"trial.{key} is missing or not a string")
        installed = d.get("installed", False)
        if not isinstance(installed, bool):
            raise ValueError("trial.installed is not true or false")
        return cls(
            slot=str(required["slot"]),
            txn=str(required["txn"]),
            bundle_version=str(required["bundle_version"]),
            security_version=_security_version(d.get("security_version"), "trial.security_version"),
            sha256=_optional_str(d, "sha256", "trial"),
            installed=installed,
            failure=_optional_str(d, "failure", "trial"),
            images=_images(d.get("images"), "trial"),
            cancelled=_optional_str(d, "cancelled", "trial"),
        )


@dataclass(frozen=True, slots=True)
class AgentState:
    committed_security_version: int = 0
    slots: dict[str, SlotRecord] = field(default_factory=dict)
    trial: Trial | None = None
    last_result: Event | None = None  # the last outcome an operator cares about

    def __post_init__(self) -> None:
        _security_version(self.committed_security_version, "committed_security_version")
        slots = {clean(k, NAME_LIMIT): v for k, v in self.slots.items()}
        if len(slots) > MAX_SLOTS:
            raise ValueError(f"more than {MAX_SLOTS} slot records")
        object.__setattr__(self, "slots", slots)

    def with_slot(self, bootname: str, record: SlotRecord) -> AgentState:
        return replace(self, slots={**self.slots, bootname: record})

    def to_json(self) -> dict[str, Any]:
        # committed_security_version first: it can be read back from the start of a damaged file
        return {
            "committed_security_version": self.committed_security_version,
            "slots": {k: asdict(v) for k, v in sorted(self.slots.items())},
            "trial": asdict(self.trial) if self.trial else None,
            "last_result": self.last_result.to_json() if self.last_result else None,
        }


def encode(state: AgentState) -> bytes:
    return json.dumps(state.to_json(), indent=2, ensure_ascii=False).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class Parsed:
    """What could be read from the bytes of a state file: the state made of every
    section that checked, and one line per section that did not."""

    state: AgentState
    problems: tuple[str, ...] = ()
    floor_known: bool = True  # the committed security version itself was readable


def parse(raw: bytes) -> Parsed:
    """Pure, and linear in `len(raw)`: the fuzzing entry point for the state reader."""
    if len(raw) > MAX_STATE:
        return _damaged(raw, f"larger than {MAX_STATE} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return _damaged(raw, f"not valid JSON ({clean(e, 120)})")
    if not isinstance(doc, dict):
        return Parsed(AgentState(), ("not a JSON object",), floor_known=False)
    problems: list[str] = []
    floor, floor_known = 0, True
    try:
        floor = _security_version(doc.get("committed_security_version"), "committed_security_version")
    except ValueError as e:
        problems.append(str(e))
        floor_known = False
    slots: dict[str, SlotRecord] = {}
    raw_slots = doc.get("slots") or {}
    if not isinstance(raw_slots, dict):
        problems.append("slots is not a JSON object")
        raw_slots = {}
    for name, value in list(raw_slots.items())[:MAX_SLOTS]:
        try:
            slots[name] = SlotRecord.from_json(value, f"slots.{clean(name, 40)}")
        except ValueError as e:
            problems.append(str(e))
    if len(raw_slots) > MAX_SLOTS:
        problems.append(f"more than {MAX_SLOTS} slot records")
    sections: dict[str, Any] = {}
    for key, build in (("trial", Trial.from_json), ("last_result", Event.from_json)):
        if doc.get(key) is None:
            continue
        try:
            sections[key] = build(doc[key])
        except ValueError as e:
            problems.append(f"{key}: {e}" if key == "last_result" else str(e))
    state = AgentState(floor, slots, sections.get("trial"), sections.get("last_result"))
    return Parsed(state, tuple(problems), floor_known)


def _damaged(raw: bytes, problem: str) -> Parsed:
    """Nothing parses, but the floor may still be read from the start (`to_json` writes it first)."""
    m = _FLOOR_AT_START.match(raw[:4096])
    floor = int(m.group(1)) if m else 0
    if floor > MAX_SECURITY_VERSION:
        floor, m = 0, None
    return Parsed(AgentState(floor), (problem,), floor_known=m is not None)


def parse_floor(raw: bytes) -> int:
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit() or len(text) > 19 or int(text) > MAX_SECURITY_VERSION:
        raise ValueError("not a security version")
    return int(text)


@dataclass(frozen=True, slots=True)
class _Inspection:
    state: AgentState  # with the floor already the highest of every source
    state_problem: str | None  # state.json must be set aside
    floor_problem: str | None  # security-floor must be set aside
    floor_file: int | None  # what security-floor holds, None if missing or unreadable
    floor_from: str  # where the floor came from, for the notice
    floor_known: bool  # False: no source could tell the floor although one should have

    @property
    def needs_repair(self) -> bool:
        missing_copy = self.floor_file is None and self.state.committed_security_version > 0
        return bool(self.state_problem or self.floor_problem or missing_copy)


class StateStore:
    def __init__(self, state_dir: Path, events: EventLog | None = None) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"
        self.floor_path = state_dir / FLOOR_FILE
        self._events = events

    @property
    def events(self) -> EventLog:
        if self._events is None:
            self._events = EventLog(self.dir)
        return self._events

    def load(self) -> AgentState:
        found = self._inspect()
        if not found.needs_repair:
            return found.state
        notices: list[tuple[int, Event]] = []
        try:
            with flocked(self.dir / LOCK_FILE):
                found = self._inspect()  # another process may have repaired it meanwhile
                if found.needs_repair:
                    notices = self._repair(found)
        except OSError as e:
            log.warning("cannot repair the agent state in %s (%s); using what could be read", self.dir, e)
        for level, event in notices:
            try:
                self.events.emit(event, level=level)
            except OSError as e:
                log.error("cannot record %r in the outbox: %s", event.reason, describe_os_error(e))
        return found.state

    def _inspect(self) -> _Inspection:
        floor_file: int | None = None
        floor_problem: str | None = None
        try:
            floor_file = parse_floor(read_bounded(self.floor_path, 64))
        except FileNotFoundError:
            pass
        except PermissionError:
            raise ConfigError(str(self.floor_path), "", "cannot read the security floor: permission denied") from None
        except OSError as e:
            floor_problem = f"unreadable ({describe_os_error(e)})"
        except ValueError as e:
            floor_problem = str(e)
        state_problem: str | None = None
        state_floor = "absent"  # or "read" (from an existing file), or "lost"
        try:
            parsed = parse(read_bounded(self.path, MAX_STATE))
            if parsed.problems:
                state_problem = "; ".join(parsed.problems)
            state, state_floor = parsed.state, "read" if parsed.floor_known else "lost"
        except FileNotFoundError:
            state = AgentState()
        except PermissionError:
            raise ConfigError(str(self.path), "", "cannot read agent state: permission denied") from None
        except OSError as e:
            state, state_problem, state_floor = AgentState(), f"unreadable ({describe_os_error(e)})", "lost"
        sources = [(state.committed_security_version, "state.json"), (floor_file or 0, FLOOR_FILE)]
        floor, floor_from = max(sources, key=lambda s: s[0])
        state = replace(state, committed_security_version=floor)
        # Known if either copy was read, or neither exists (a fresh device, or one that never raised it).
        known = floor_file is not None or state_floor == "read" or (state_floor == "absent" and not floor_problem)
        return _Inspection(state, state_problem, floor_problem, floor_file, floor_from, known)

    def _repair(self, found: _Inspection) -> list[tuple[int, Event]]:
        """Set aside what cannot be used, save what was recovered; the notices to emit."""
        now = utcnow()
        notices: list[tuple[int, Event]] = []
        floor = found.state.committed_security_version

        def notice(level: int, result: Result, reason: str) -> None:
            notices.append((level, Event(event=EventType.STATE, result=result, reason=reason, time=iso(now))))

        for path, problem, what in (
            (self.floor_path, found.floor_problem, "security floor file set aside"),
            (self.path, found.state_problem, "state set aside"),
        ):
            if problem is None:
                continue
            moved = ""
            with contextlib.suppress(FileNotFoundError):
                moved = f"; moved to {set_aside(path, now).name}"
            kept = f"; security floor {floor} kept (from {found.floor_from})" if found.floor_known else ""
            notice(logging.WARNING, Result.SET_ASIDE, f"{what}: {problem}{moved}{kept}")
        if not found.floor_known:
            notice(
                logging.ERROR,
                Result.FLOOR_LOST,
                f"anti-rollback protection reset: neither state.json nor {FLOOR_FILE} could be read, so the "
                f"committed security version is now {floor} and older bundles are accepted until the next "
                "commit; check what this device runs",
            )
        self._save_locked(found.state)
        return notices

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for changes that span several steps (an install, a boot-check);
        raises LockBusyError at once when another process holds it."""
        make_dirs(self.dir, 0o700)
        try:
            fd = open_regular(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(str(self.dir / "lock"), "", f"cannot open the state lock: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockBusyError(
                    f"busy: another ota-agent command (an install, boot-check or mark) is in progress "
                    f"(it holds the state lock {self.dir / 'lock'}); try again when it has finished"
                ) from None
            yield
        finally:
            os.close(fd)

    def save(self, state: AgentState) -> None:
        """Durably replace the state; a full, read-only or failing disk is an
        InstallError naming the directory and the system's reason (one line)."""
        try:
            with flocked(self.dir / LOCK_FILE):
                self._save_locked(state)
        except OSError as e:
            raise InstallError(f"cannot save the agent state in {self.dir}: {e.strerror or e}") from None

    def _save_locked(self, state: AgentState) -> None:
        data = encode(state)
        if len(data) > MAX_STATE:
            raise InstallError(f"refusing to save agent state of {len(data)} bytes (the reader accepts {MAX_STATE})")
        ensure_dir(self.dir)
        floor = state.committed_security_version
        try:
            on_disk: int | None = parse_floor(read_bounded(self.floor_path, 64))
        except (OSError, ValueError):
            on_disk = None
        if floor > (on_disk or 0) or (on_disk is None and floor > 0):
            atomic_write(self.floor_path, b"%d\n" % floor)  # first: the floor is never lower on disk than in use
        atomic_write(self.path, data)
