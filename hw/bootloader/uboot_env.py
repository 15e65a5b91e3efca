"""U-Boot environment storage, read and written natively, compatible with libubootenv.

Owns the bytes: parsing ``fw_env.config`` (one line = one copy, two lines = a
redundant pair), the layout of one copy (CRC32 little-endian over the data area;
for a redundant copy a flags byte follows; then ``name=value\\0...\\0\\0``
padded to the env size), choosing the current copy exactly as U-Boot's
``env_import_redund`` and libubootenv's ``libuboot_load`` do, and writes that a
power cut cannot turn into an invalid environment: the *inactive* copy is
written whole with the flags counter incremented, then fsynced. Like
libubootenv it takes /var/lock/fw_printenv.lock and clears an eMMC boot
partition's ``force_ro`` around a write.

Does not own what the variables mean (`hw.bootloader.uboot` maps `BootState`
onto them) and does not drive raw NOR/NAND flash or UBI volumes (``/dev/mtd*``,
``/dev/ubi*`` need erase blocks and ioctls: use libubootenv's tools there).
Differences from libubootenv 0.3.2, all deliberate: a config line that cannot
be parsed is an error instead of being skipped; an unreadable or short copy
counts as invalid (U-Boot's rule) instead of failing the whole read.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from hw.errors import BootEnvError
from ota_common.fsutil import atomic_write, kind_of, open_regular, read_regular

BACKEND = "uboot"
MAX_ENV_SIZE = 8 * 1024 * 1024
MIN_ENV_SIZE = 8
MAX_CONFIG_SIZE = 64 * 1024
LOCK_PATH = Path("/var/lock/fw_printenv.lock")  # the lock libubootenv's tools take
_ENCODING = ("utf-8", "surrogateescape")  # any byte string round-trips unchanged


@dataclass(frozen=True, slots=True)
class EnvLocation:
    """One copy of the environment: ``device offset size [sector-size [sectors]]``."""

    device: Path
    offset: int
    size: int
    sector_size: int | None = None
    sectors: int | None = None

    def describe(self) -> str:
        return f"{self.device}@{self.offset:#x}"


@dataclass(frozen=True, slots=True)
class FwEnvConfig:
    copies: tuple[EnvLocation, ...]

    @property
    def redundant(self) -> bool:
        return len(self.copies) == 2

    @property
    def size(self) -> int:
        return self.copies[0].size

    def render(self) -> str:
        """The config as fw_printenv reads it (offsets and sizes in hex)."""
        lines = []
        for c in self.copies:
            fields = [str(c.device), f"{c.offset:#x}", f"{c.size:#x}"]
            if c.sector_size is not None:
                fields.append(f"{c.sector_size:#x}")
                if c.sectors is not None:
                    fields.append(f"{c.sectors:#x}")
            lines.append(" ".join(fields))
        return "\n".join(lines) + "\n"


def _c_int(text: str) -> int:
    """An integer as C's strtoll(base 0) reads it: 0x hex, leading-0 octal, else decimal."""
    sign = -1 if text.startswith("-") else 1
    body = text[1:] if text[:1] in "+-" else text
    if body[:2].lower() == "0x":
        return sign * int(body[2:], 16)
    if len(body) > 1 and body.startswith("0"):
        return sign * int(body[1:], 8)
    return sign * int(body, 10)


def _hex(text: str) -> int:
    """An integer as scanf's %x reads it: hex, with or without 0x."""
    return int(text[2:] if text[:2].lower() == "0x" else text, 16)


def parse_fw_env_config(text: str, source: str = "fw_env.config") -> FwEnvConfig:
    copies: list[EnvLocation] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        fields = []
        for w in words[:5]:
            if w.startswith("#"):
                break
            fields.append(w)
        where = f"{source} line {lineno}"
        if len(fields) < 3:
            raise BootEnvError(BACKEND, f"{where}: need 'device offset size', got {line.strip()!r}")
        try:
            offset, size = _c_int(fields[1]), _hex(fields[2])
        except ValueError:
            raise BootEnvError(BACKEND, f"{where}: offset or size is not a number: {line.strip()!r}") from None
        extra: list[int | None] = [None, None]
        for i, w in enumerate(fields[3:5]):
            try:
                extra[i] = _hex(w)
            except ValueError:
                break  # like scanf: stop at the first field that is not a number
        if not MIN_ENV_SIZE <= size <= MAX_ENV_SIZE:
            raise BootEnvError(BACKEND, f"{where}: env size {size:#x} not in {MIN_ENV_SIZE}..{MAX_ENV_SIZE:#x}")
        device = fields[0]
        if device.startswith(("/dev/mtd", "/dev/ubi")):
            raise BootEnvError(BACKEND, f"{where}: {device}: raw MTD/UBI storage is not supported natively")
        copies.append(EnvLocation(Path(device), offset, size, extra[0], extra[1]))
    if not copies:
        raise BootEnvError(BACKEND, f"{source}: no environment location configured")
    if len(copies) > 2:
        raise BootEnvError(BACKEND, f"{source}: {len(copies)} locations configured, at most 2 (redundant pair)")
    if len(copies) == 2:
        a, b = copies
        if a.size != b.size:
            raise BootEnvError(BACKEND, f"{source}: the two copies differ in size ({a.size:#x} != {b.size:#x})")
        if a.device == b.device and a.offset >= 0 and b.offset >= 0 and abs(a.offset - b.offset) < a.size:
            raise BootEnvError(BACKEND, f"{source}: the two copies overlap on {a.device}")
    return FwEnvConfig(tuple(copies))


def load_fw_env_config(path: Path) -> FwEnvConfig:
    try:
        raw = read_regular(path, MAX_CONFIG_SIZE + 1)
    except OSError as e:
        raise BootEnvError(BACKEND, f"cannot read config: {e.strerror}", path=str(path)) from e
    if len(raw) > MAX_CONFIG_SIZE:
        raise BootEnvError(BACKEND, f"config larger than {MAX_CONFIG_SIZE} bytes", path=str(path))
    return parse_fw_env_config(raw.decode("utf-8", "replace"), str(path))


# --- one copy: pure codec ---------------------------------------------------------------


def header_size(redundant: bool) -> int:
    return 5 if redundant else 4


@dataclass(frozen=True, slots=True)
class EnvCopy:
    """One decoded copy. ``variables`` is empty and ``problem`` says why when not valid."""

    valid: bool
    flags: int
    variables: Mapping[str, str]
    problem: str = ""


def _check_var(name: str, value: str) -> None:
    if not name or "=" in name or "\0" in name:
        raise BootEnvError(BACKEND, f"invalid variable name {name!r}")
    if "\0" in value:
        raise BootEnvError(BACKEND, f"variable {name}: value contains a NUL byte")


def encode_copy(variables: Mapping[str, str], size: int, *, redundant: bool, flags: int = 1, pad: int = 0) -> bytes:
    """One copy as U-Boot's saveenv lays it out: variables sorted by name (as U-Boot's
    export and fw_setenv write them), one extra NUL, padding (U-Boot pads with 0x00,
    ``mkenvimage`` with 0xff by default)."""
    hdr = header_size(redundant)
    data = bytearray()
    for name in sorted(variables, key=lambda n: n.encode(*_ENCODING)):
        value = variables[name]
        _check_var(name, value)
        data += f"{name}={value}".encode(*_ENCODING) + b"\0"
    data += b"\0"
    room = size - hdr
    if len(data) > room:
        raise BootEnvError(BACKEND, f"environment needs {len(data)} bytes, only {room} fit in {size:#x}")
    data += bytes([pad]) * (room - len(data))
    head = struct.pack("<I", zlib.crc32(data)) + (bytes([flags & 0xFF]) if redundant else b"")
    return head + bytes(data)


def decode_copy(blob: bytes, *, redundant: bool) -> EnvCopy:
    hdr = header_size(redundant)
    if len(blob) < hdr + 1:
        return EnvCopy(False, 0, {}, f"only {len(blob)} bytes")
    flags = blob[4] if redundant else 0
    data = memoryview(blob)[hdr:]
    if zlib.crc32(data) != struct.unpack_from("<I", blob)[0]:
        return EnvCopy(False, flags, {}, "bad CRC")
    variables: dict[str, str] = {}
    pos, end = 0, len(data)
    while pos < end and data[pos] != 0:
        nul = blob.find(b"\0", hdr + pos) - hdr
        if nul < 0:
            return EnvCopy(False, flags, {}, "last variable not NUL-terminated")
        name, sep, value = bytes(data[pos:nul]).partition(b"=")
        if sep and name:  # entries without '=' or with an empty name are dropped, as libubootenv does
            variables[name.decode(*_ENCODING)] = value.decode(*_ENCODING)
        pos = nul + 1
    return EnvCopy(True, flags, variables)


def select_current(first: EnvCopy, second: EnvCopy) -> int | None:
    """Index of the copy U-Boot and libubootenv use; None when neither is valid.
    Both valid: the higher flags counter, except that 0 is newer than 255 (wrap);
    equal counters go to the first copy."""
    if first.valid != second.valid:
        return 0 if first.valid else 1
    if not first.valid:
        return None
    if first.flags == 0xFF and second.flags == 0:
        return 1
    if second.flags == 0xFF and first.flags == 0:
        return 0
    return 1 if second.flags > first.flags else 0


# --- storage: files and block devices ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvSnapshot:
    """The environment as read: its variables, which copy they came from, that copy's flags."""

    variables: Mapping[str, str]
    current: int
    flags: int
    config: FwEnvConfig


def _os_error(action: str, loc: EnvLocation, e: OSError) -> BootEnvError:
    return BootEnvError(BACKEND, f"cannot {action} {loc.describe()}: {e.strerror or e}", path=str(loc.device))


def _open_copy(loc: EnvLocation, flags: int, action: str) -> int:
    """Open a copy's file or block device (a symlink such as /dev/disk/by-partlabel/x
    is followed on purpose) without blocking, refusing a FIFO, socket or anything
    but a regular file or block device."""
    try:
        fd = os.open(loc.device, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise _os_error(action, loc, e) from e
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise BootEnvError(BACKEND, f"cannot {action} {loc.describe()}: it is {kind_of(mode)}, "
                               "not a regular file or block device", path=str(loc.device))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except OSError as e:
        os.close(fd)
        raise _os_error(action, loc, e) from e
    except BaseException:
        os.close(fd)
        raise
    return fd


def _resolve_offset(fd: int, loc: EnvLocation) -> int:
    if loc.offset >= 0:
        return loc.offset
    end = os.lseek(fd, 0, os.SEEK_END)  # negative offset: from the end of the device
    if end + loc.offset < 0:
        raise BootEnvError(BACKEND, f"offset {loc.offset} lies before the start of a {end}-byte device",
                           path=str(loc.device))
    return end + loc.offset


def _read_copy(loc: EnvLocation, redundant: bool) -> EnvCopy:
    fd = _open_copy(loc, os.O_RDONLY, "open")
    try:
        offset = _resolve_offset(fd, loc)
        chunks, got = [], 0
        while got < loc.size:
            chunk = os.pread(fd, loc.size - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        return EnvCopy(False, 0, {}, f"read error: {e.strerror}")
    finally:
        os.close(fd)
    if got < loc.size:
        return EnvCopy(False, 0, {}, f"short read: {got} of {loc.size} bytes")
    return decode_copy(b"".join(chunks), redundant=redundant)


_BOOT_PARTITION = re.compile(r"/dev/(?:block/)?(mmcblk\d+boot\d+)")


def force_ro_path(device: Path) -> Path | None:
    """The sysfs switch that keeps an eMMC boot partition read-only, if ``device`` is one
    (libubootenv clears it around a write and sets it again afterwards)."""
    m = _BOOT_PARTITION.fullmatch(os.path.realpath(device))
    return Path("/sys/class/block") / m.group(1) / "force_ro" if m else None


@contextmanager
def _writable(loc: EnvLocation) -> Iterator[None]:
    switch = force_ro_path(loc.device)
    if switch is None or not os.access(switch, os.W_OK):
        yield
        return
    try:
        switch.write_text("0")
    except OSError as e:
        raise _os_error(f"clear {switch} for", loc, e) from e
    try:
        yield
    finally:
        with suppress(OSError):  # like libubootenv: the env is written; re-protecting is best effort
            switch.write_text("1")


def _write_in_place(loc: EnvLocation, blob: bytes) -> None:
    with _writable(loc):
        fd = _open_copy(loc, os.O_WRONLY, "open for writing")
        try:
            offset = _resolve_offset(fd, loc)
            view = memoryview(blob)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            os.fsync(fd)
        except OSError as e:
            raise _os_error("write", loc, e) from e
        finally:
            os.close(fd)


def _whole_regular_file(loc: EnvLocation) -> os.stat_result | None:
    """The file's stat when the copy is exactly a whole regular file (replaceable atomically)."""
    try:
        st = os.stat(loc.device)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and loc.offset == 0 and st.st_size == loc.size else None


@contextmanager
def _tool_lock() -> Iterator[None]:
    """Serialise with fw_printenv/fw_setenv on their lock file; best effort like theirs."""
    try:
        fd = open_regular(LOCK_PATH, os.O_WRONLY | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class UBootEnvStore:
    """The environment described by one fw_env.config, read and written like fw_setenv."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path

    def config(self) -> FwEnvConfig:
        return load_fw_env_config(self.config_path)

    def read(self) -> EnvSnapshot:
        with _tool_lock():
            return self._read(self.config())

    def update(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        """Read-modify-write: set each name to its value, delete it when the value is None,
        keep every other variable exactly as it was. Returns the variables written."""
        with _tool_lock():
            snap = self._read(self.config())
            new = dict(snap.variables)
            for name, value in changes.items():
                if value is None:
                    new.pop(name, None)
                else:
                    new[name] = value
            self._write(snap, new)
            return new

    def create(self, variables: Mapping[str, str]) -> None:
        """Write a first environment holding only ``variables``, creating the backing
        files. Refuses when the storage already exists: a device whose env is missing
        runs on U-Boot's built-in default env, and an env of ours alone would replace
        all of it (bootcmd included)."""
        with _tool_lock():
            cfg = self.config()
            existing = [c.describe() for c in cfg.copies if c.device.exists()]
            if existing:
                raise BootEnvError(BACKEND, f"refusing to create over existing storage {', '.join(existing)}",
                                   path=str(self.config_path))
            # Every copy valid from the start (equal flags: the first one is current, as for
            # U-Boot and fw_printenv), and each file written whole under its final name at
            # once (atomic_write): a power cut leaves no file or a complete one, never a file
            # without a valid copy, which would read as a board on its default env.
            blob = encode_copy(variables, cfg.size, redundant=cfg.redundant, flags=1)
            files: dict[Path, bytearray] = {}
            for c in cfg.copies:
                if c.offset < 0:
                    raise BootEnvError(BACKEND, f"cannot create {c.describe()}: negative offset on a new file")
                buf = files.setdefault(c.device, bytearray())
                end = c.offset + c.size
                buf.extend(bytes(max(0, end - len(buf))))
                buf[c.offset : end] = blob
            for c in cfg.copies:
                data = files.pop(c.device, None)
                if data is None:
                    continue
                try:
                    atomic_write(c.device, bytes(data), mode=0o644)
                except OSError as e:
                    raise _os_error("create", c, e) from e

    def _read(self, cfg: FwEnvConfig) -> EnvSnapshot:
        copies = [_read_copy(loc, cfg.redundant) for loc in cfg.copies]
        current = select_current(copies[0], copies[1]) if cfg.redundant else (0 if copies[0].valid else None)
        if current is None:
            why = "; ".join(f"{loc.describe()}: {c.problem}" for loc, c in zip(cfg.copies, copies, strict=True))
            raise BootEnvError(BACKEND, f"no valid environment copy ({why})", path=str(self.config_path))
        return EnvSnapshot(copies[current].variables, current, copies[current].flags, cfg)

    def _write(self, snap: EnvSnapshot, variables: Mapping[str, str]) -> None:
        cfg = snap.config
        if cfg.redundant:
            target = 1 - snap.current
            blob = encode_copy(variables, cfg.size, redundant=True, flags=(snap.flags + 1) & 0xFF)
            self._write_copy(cfg.copies[target], blob, replace_whole_file=False)
        else:
            blob = encode_copy(variables, cfg.size, redundant=False)
            self._write_copy(cfg.copies[0], blob, replace_whole_file=True)

    def _write_copy(self, loc: EnvLocation, blob: bytes, *, replace_whole_file: bool) -> None:
        st = _whole_regular_file(loc) if replace_whole_file else None
        if st is None:
            _write_in_place(loc, blob)
            return
        # A single copy that is a whole file (uboot.env on a FAT /boot): replace the file
        # atomically, so a power cut leaves the old or the new env, never a torn one.
        try:
            atomic_write(loc.device.resolve(), blob, mode=stat.S_IMODE(st.st_mode))
        except OSError as e:
            raise _os_error("replace", loc, e) from e
