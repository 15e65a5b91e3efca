"""systemd-boot / Boot Loader Specification backend: `BootState` as BLS Type #1
entry *file names*, with boot counting exactly as systemd-boot and
systemd-bless-boot do it.

This module owns the mapping between `model.BootState` and the files in
``<esp>/loader/entries/`` plus the one ``default`` line of ``<esp>/loader/loader.conf``.
It does not own the entries' contents beyond a template written by `create()`
(kernel, initrd and command line are the integrator's), nor EFI variables
(it only refuses to work when one would override its choice).

One entry per slot, named ``ota-<generation>-<slot>[+LEFT[-DONE]].conf``:

* ``+LEFT-DONE`` is the BLS boot counter: no counter = GOOD, ``LEFT > 0`` =
  TRIAL with LEFT tries left, ``+0-DONE`` with DONE > 0 = TRIAL with 0 tries
  left (used up: the entry systemd-boot boots for the last try has this name),
  ``+0`` = BAD. systemd-boot renames ``+L-D`` to ``+(L-1)-(D+1)`` before each
  boot of the entry; systemd-bless-boot renames to no counter (good) or
  ``+0-D`` (bad, which reads as a used-up trial: never booted again either way).
* ``<generation>`` expresses ``order``. systemd-boot sorts entries without a
  ``sort-key`` by id (the name minus the counter), newest version first, after
  moving entries with 0 tries left to the end; ``loader.conf`` says
  ``default ota-*``, so it boots the first of our entries in that order. A
  higher generation therefore means a higher priority, and `set_primary` is one
  rename that gives the slot ``max(generation) + 1`` together with its counter.

What BLS cannot express, and how this backend handles it (docs/bootloaders.md):

* ``last_good`` has no storage: it is *derived* as the first GOOD slot in
  ``order`` (None when no slot is GOOD). That is what the model's rules yield in
  every transition the agent makes (mark_bad before set_primary); `store`
  refuses, loudly, a state whose ``last_good`` differs.
* The DONE counter is systemd-boot's bookkeeping, not part of `BootState`; it
  is kept and continued, except that `mark_bad` resets it (``+0``), so a slot the
  agent rejected is never mistaken for a trial on its last try. A bad entry that
  systemd-boot boots anyway, because nothing else is bootable, gets DONE 1 and
  reads as a used-up trial from then on.

Every change is a rename inside ``loader/entries`` followed by an fsync of the
directory; each agent verb (set_primary, mark_good, mark_bad) is exactly one
rename, so a power cut leaves either the old or the new name.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hw.bootloader.model import BootDecision, BootState, SlotBoot, SlotBootState
from hw.errors import BootEnvError
from ota_common.fsutil import atomic_write, fsync_dir, make_dirs, read_regular

PREFIX = "ota-"
SUFFIX = ".conf"
DEFAULT_PATTERN = "ota-*"
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
OVERRIDING_EFIVARS = ("LoaderEntryOneShot", "LoaderEntryDefault")
MAX_FILE = 64 * 1024
MAX_COUNTER = 2**31 - 1  # systemd-boot ignores counters above INT_MAX

_NAME = re.compile(
    r"ota-(?P<gen>[0-9]{1,9})-(?P<slot>[A-Za-z0-9_]+)(?:\+(?P<left>[0-9]{1,10})(?:-(?P<done>[0-9]{1,10}))?)?\.conf",
    re.IGNORECASE,
)
_BOOTNAME = re.compile(r"[A-Za-z0-9_]{1,64}")


@dataclass(frozen=True, slots=True)
class Entry:
    """One of our entry files as systemd-boot sees it."""

    slot: str
    generation: int
    tries_left: int | None  # None: no counter, the entry is good
    tries_done: int
    name: str

    @property
    def id(self) -> str:
        """The entry id systemd-boot matches ``default`` against (it lower-cases it)."""
        return f"{PREFIX}{self.generation}-{self.slot}{SUFFIX}".lower()

    @property
    def boot_state(self) -> SlotBoot:
        if self.tries_left is None:
            return SlotBoot(SlotBootState.GOOD)
        if self.tries_left == 0 and self.tries_done == 0:
            return SlotBoot(SlotBootState.BAD)
        return SlotBoot(SlotBootState.TRIAL, self.tries_left)


def entry_name(slot: str, generation: int, tries_left: int | None, tries_done: int = 0) -> str:
    """The file name for an entry: no counter when good, ``+LEFT`` or ``+LEFT-DONE`` otherwise."""
    base = f"{PREFIX}{generation}-{slot}"
    if tries_left is None:
        return base + SUFFIX
    if tries_done == 0:
        return f"{base}+{tries_left}{SUFFIX}"
    return f"{base}+{tries_left}-{tries_done}{SUFFIX}"


def parse_entry_name(name: str) -> Entry | None:
    """Parse one of our names; None for a name that is not ours (another OS's entry)."""
    if not _is_ours(name):
        return None
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    left = None if m["left"] is None else int(m["left"])
    done = 0 if m["done"] is None else int(m["done"])
    if (left is not None and left > MAX_COUNTER) or done > MAX_COUNTER:
        return None
    return Entry(m["slot"], int(m["gen"]), left, done, name)


def sd_boot_order(entries: Iterable[Entry]) -> list[Entry]:
    """systemd-boot's menu order for our entries: entries with 0 tries left last,
    then by id, newest version first (our ids differ only in the generation)."""
    return sorted(entries, key=lambda e: (e.tries_left == 0, -e.generation, e.slot))


def next_attempt_name(entry: Entry) -> str | None:
    """The name systemd-boot renames the entry to before booting it: LEFT-1 (not
    below 0) and DONE+1, both always written. None: the entry is not counted."""
    if entry.tries_left is None:
        return None
    left, done = max(entry.tries_left - 1, 0), min(entry.tries_done + 1, MAX_COUNTER)
    return f"{PREFIX}{entry.generation}-{entry.slot}+{left}-{done}{SUFFIX}"


def _is_ours(name: str) -> bool:
    low = name.lower()
    return low.startswith(PREFIX) and low.endswith(SUFFIX)


class BlsEnv:
    name = "bls"

    def __init__(
        self,
        path: Path,
        bootnames: Sequence[str],
        *,
        efivars: Path | None = Path("/sys/firmware/efi/efivars"),
    ) -> None:
        self.path = path
        self.entries_dir = path / "loader" / "entries"
        self.loader_conf = path / "loader" / "loader.conf"
        self.bootnames = tuple(bootnames)
        self.efivars = efivars
        for b in self.bootnames:
            if not _BOOTNAME.fullmatch(b):
                raise BootEnvError(self.name, f"bootname {b!r} must be 1-64 letters, digits or '_'")
        if len({b.lower() for b in self.bootnames}) != len(self.bootnames):
            raise BootEnvError(self.name, "bootnames must differ in more than case (systemd-boot lower-cases ids)")

    # -- BootEnv ------------------------------------------------------------

    def load(self) -> BootState:
        return decode(self.entries())

    def store(self, state: BootState) -> None:
        self._require_slots(state.order)
        expected = derived_last_good(state)
        if state.last_good != expected:
            raise BootEnvError(
                self.name,
                f"cannot express last_good={state.last_good!r}: BLS keeps no such record, it is the first good "
                f"entry in priority order ({expected!r} here)",
                path=str(self.entries_dir),
            )
        current = {e.slot: e for e in self.entries()}
        for old, new in plan_renames(current, state):
            self._rename(old, new)

    # -- what systemd-boot itself does ------------------------------------------

    def simulate_boot(self) -> BootDecision:
        """One power-on exactly as systemd-boot does it: pick the first ``ota-*``
        entry in menu order, bump its counter by renaming it, boot it."""
        entries = self.entries()
        chosen = sd_boot_order(entries)[0]
        new = next_attempt_name(chosen)
        if new is not None:
            self._rename(chosen.name, new)
        if chosen.tries_left is None:
            return BootDecision(chosen.slot, "good entry", trial=False)
        if chosen.tries_left > 0:
            left = chosen.tries_left - 1
            return BootDecision(chosen.slot, f"counted entry, {left} tries left after this one", trial=True)
        return BootDecision(chosen.slot, "every entry has 0 tries left; first in menu order", trial=False)

    def create(self) -> None:
        """A fresh ESP layout equal to `BootState.initial`: loader.conf's default,
        one template entry per slot (ours only; other entries are left alone)."""
        try:
            make_dirs(self.entries_dir)
            for name in os.listdir(self.entries_dir):
                if _is_ours(name):
                    (self.entries_dir / name).unlink()
            n = len(self.bootnames)
            for i, slot in enumerate(self.bootnames):
                atomic_write(self.entries_dir / entry_name(slot, n - i, None), entry_template(slot).encode())
            atomic_write(self.loader_conf, _with_default(self._read_optional(self.loader_conf)).encode())
        except OSError as e:
            raise BootEnvError(self.name, f"cannot create: {e.strerror}", path=str(e.filename or self.path)) from e

    # -- reading ------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Our entries, validated: one per bootname, distinct generations, contents
        that systemd-boot would count and order as we expect, and no loader.conf or
        EFI variable that overrides the choice."""
        self._check_loader_conf()
        self._check_efivars()
        try:
            names = sorted(os.listdir(self.entries_dir))
        except OSError as e:
            raise BootEnvError(self.name, f"cannot list entries: {e.strerror}", path=str(self.entries_dir)) from e
        found: dict[str, Entry] = {}
        for name in names:
            if name.startswith(".") or not _is_ours(name):
                continue
            entry = parse_entry_name(name)
            if entry is None:
                raise BootEnvError(
                    self.name,
                    f"entry {name!r} starts with {PREFIX!r} but is not ota-<generation>-<slot>[+LEFT[-DONE]].conf",
                    path=str(self.entries_dir),
                )
            if entry.slot not in self.bootnames:
                raise BootEnvError(
                    self.name,
                    f"entry {name!r} is for slot {entry.slot!r}, not one of {', '.join(self.bootnames)}",
                    path=str(self.entries_dir),
                )
            if entry.slot in found:
                raise BootEnvError(
                    self.name, f"two entries for slot {entry.slot}: {found[entry.slot].name!r} and {name!r}",
                    path=str(self.entries_dir),
                )
            self._check_contents(entry)
            found[entry.slot] = entry
        missing = [b for b in self.bootnames if b not in found]
        if missing:
            raise BootEnvError(self.name, f"no entry for slot(s) {', '.join(missing)}", path=str(self.entries_dir))
        gens: dict[int, str] = {}
        for ent in found.values():
            if ent.generation in gens:
                raise BootEnvError(
                    self.name, f"slots {gens[ent.generation]} and {ent.slot} share generation {ent.generation}; "
                    "the priority order would be ambiguous", path=str(self.entries_dir),
                )
            gens[ent.generation] = ent.slot
        return list(found.values())

    def _check_contents(self, entry: Entry) -> None:
        path = self.entries_dir / entry.name
        text = self._read(path)
        keys: dict[str, list[str]] = {}
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.replace("\t", " ").partition(" ")
            keys.setdefault(key, []).append(value.strip())
        if "linux" not in keys and "uki" not in keys:
            raise BootEnvError(
                self.name, "entry has no 'linux' or 'uki' line; systemd-boot counts boots only for those",
                path=str(path),
            )
        if "sort-key" in keys:
            raise BootEnvError(
                self.name, "entry has a 'sort-key' line; it would override the generation order", path=str(path)
            )
        for word in " ".join(keys.get("options", [])).split():
            k, _, v = word.partition("=")
            if k in ("ota.slot", "rauc.slot") and v != entry.slot:
                raise BootEnvError(self.name, f"entry for slot {entry.slot} boots with {word}", path=str(path))

    def _check_loader_conf(self) -> None:
        text = self._read(self.loader_conf)
        default = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.replace("\t", " ").partition(" ")
            if key == "default":
                default = value.strip()  # the last one wins, as in systemd-boot
        if default is None or default.lower() != DEFAULT_PATTERN:
            raise BootEnvError(
                self.name,
                f"loader.conf must say 'default {DEFAULT_PATTERN}' (has {default!r}); any other default makes "
                "systemd-boot boot an entry whose tries are exhausted instead of falling back",
                path=str(self.loader_conf),
            )

    def _check_efivars(self) -> None:
        if self.efivars is None or not self.efivars.is_dir():
            return
        for var in OVERRIDING_EFIVARS:
            path = self.efivars / f"{var}-{LOADER_GUID}"
            try:
                raw = read_regular(path, MAX_FILE)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise BootEnvError(self.name, f"cannot read EFI variable {var}: {e.strerror}", path=str(path)) from e
            value = raw[4:].decode("utf-16-le", "replace").split("\0", 1)[0]
            if value and value.lower() != DEFAULT_PATTERN:
                raise BootEnvError(
                    self.name,
                    f"EFI variable {var}={value!r} overrides loader.conf's default and defeats fallback "
                    "(clear it: bootctl set-default '' / set-oneshot '')",
                    path=str(path),
                )

    def _read(self, path: Path) -> str:
        try:
            raw = read_regular(path, MAX_FILE + 1)
        except OSError as e:
            raise BootEnvError(self.name, f"cannot read: {e.strerror}", path=str(path)) from e
        if len(raw) > MAX_FILE:
            raise BootEnvError(self.name, f"larger than {MAX_FILE} bytes", path=str(path))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BootEnvError(self.name, f"not UTF-8: {e}", path=str(path)) from e

    def _read_optional(self, path: Path) -> str:
        return self._read(path) if path.exists() else ""

    # -- writing ------------------------------------------------------------

    def _rename(self, old: str, new: str) -> None:
        src, dst = self.entries_dir / old, self.entries_dir / new
        try:
            if os.path.lexists(dst):
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
            os.rename(src, dst)
            fsync_dir(self.entries_dir)
        except OSError as e:
            raise BootEnvError(
                self.name, f"cannot rename {old} to {new}: {e.strerror}", path=str(self.entries_dir)
            ) from e

    def _require_slots(self, order: Sequence[str]) -> None:
        if sorted(order) != sorted(self.bootnames):
            raise BootEnvError(self.name, f"state lists slots {tuple(order)}, config has {self.bootnames}")


def decode(entries: Sequence[Entry]) -> BootState:
    """`BootState` from validated entries: order by generation, state by counter,
    last_good derived."""
    by_gen = sorted(entries, key=lambda e: -e.generation)
    state = BootState(order=tuple(e.slot for e in by_gen), slots={e.slot: e.boot_state for e in entries})
    return BootState(order=state.order, slots=state.slots, last_good=derived_last_good(state))


def derived_last_good(state: BootState) -> str | None:
    """BLS's only notion of "the committed fallback": the first good entry in order."""
    return next((b for b in state.order if state.slots[b].state is SlotBootState.GOOD), None)


def plan_renames(current: dict[str, Entry], state: BootState) -> list[tuple[str, str]]:
    """The renames that turn `current` into `state`, least bootable targets first.
    Every single-verb change (set_primary, mark_good, mark_bad) is one rename."""
    gens = _generations({s: e.generation for s, e in current.items()}, state.order)
    plan: list[tuple[int, str, str]] = []
    for slot in state.order:
        cur = current[slot]
        left, done = _counters(cur, state.slots[slot])
        if (gens[slot], left, done) == (cur.generation, cur.tries_left, cur.tries_done):
            continue
        rank = 0 if left == 0 else 1 if left is not None else 2
        plan.append((rank, cur.name, entry_name(slot, gens[slot], left, done)))
    plan.sort(key=lambda p: p[0])
    return [(old, new) for _, old, new in plan]


def _generations(current: dict[str, int], order: Sequence[str]) -> dict[str, int]:
    """Strictly decreasing generations along `order`, keeping every current one
    that already fits: moving one slot to the front changes only its generation.
    A new generation is above every current one, so no two names ever collide."""
    out: dict[str, int] = {}
    floor = 0
    top = max(current.values())
    for slot in reversed(order):
        gen = current[slot]
        if gen <= floor:
            gen = max(floor, top) + 1
        out[slot] = gen
        floor = gen
    return out


def _counters(cur: Entry, want: SlotBoot) -> tuple[int | None, int]:
    """(LEFT, DONE) for the wanted slot state, continuing the current counters the
    way systemd-boot (LEFT-1, DONE+1 per attempt) and systemd-bless-boot (good: no
    counter) would. BAD is ``+0`` and a used-up trial ``+0-DONE`` with DONE >= 1,
    so every state reads back as stored."""
    if want.state is SlotBootState.GOOD:
        return None, 0
    if want.state is SlotBootState.BAD:
        return 0, 0
    if cur.tries_left is None:
        left, done = want.tries_left, 0
    elif cur.tries_left >= want.tries_left:
        left, done = want.tries_left, min(cur.tries_done + cur.tries_left - want.tries_left, MAX_COUNTER)
    else:
        left, done = want.tries_left, 0
    return left, max(done, 1) if left == 0 else done


def entry_template(slot: str) -> str:
    return (
        f"# edge-ota slot {slot}. The file NAME is the bootloader state: ota-<generation>-<slot> orders the\n"
        "# slots (highest generation first) and +LEFT-DONE is the boot counter. edge-ota and systemd-boot\n"
        "# rename this file, never rewrite it; edit the lines below to match your kernel and root device.\n"
        f"title edge-ota slot {slot}\n"
        f"linux /ota/{slot}/vmlinuz\n"
        f"initrd /ota/{slot}/initrd.img\n"
        f"options root=PARTLABEL=rootfs-{slot} ro ota.slot={slot}\n"
    )


def _with_default(text: str) -> str:
    kept = [
        line for line in text.splitlines()
        if line.strip().replace("\t", " ").partition(" ")[0] != "default"
        and "edge-ota: systemd-boot boots the first ota-*" not in line
    ]
    head = [
        "# edge-ota: systemd-boot boots the first ota-* entry in its menu order (tries left before none left,",
        "# then the highest generation). Do not set another default here or with bootctl set-default.",
        f"default {DEFAULT_PATTERN}",
    ]
    return "\n".join(head + kept) + "\n"
