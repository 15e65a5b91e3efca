"""The receipt of a stick's visit (`ota_common.media.Receipt`: device id, old and
new version, result, reason, time, ignored bundles), delivered two ways:

- queued in the outbox as a `media` event (result, a one-line summary, txn,
  version, slot), so the fleet gets it when the device next connects; always,
  and first: the stick may be gone;
- written back onto the stick as `edge-ota/reports/NAME.json` and `NAME.txt`
  when it is writable: each file written to a temporary name, fsynced, renamed
  into place and the directory fsynced; every directory opened with O_NOFOLLOW
  relative to its parent and every file created with O_EXCL|O_NOFOLLOW, so a
  symlink planted on the stick redirects nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os

from agent.crashpoint import crashpoint
from agent.events import Event, EventType
from agent.outbox import EventLog
from ota_common import media as layout
from ota_common.media import Receipt
from ota_common.text import clean

EVENT = EventType.MEDIA  # the outbox record's `event`
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def summary(r: Receipt) -> str:
    versions = f"{r.old_version or '-'} -> {r.new_version or '-'}"
    ignored = f"; {len(r.ignored)} bundle(s) ignored" if r.ignored else ""
    return f"usb {r.result.value} ({versions}): {r.reason}{ignored}"


def queue(events: EventLog, r: Receipt) -> Event:
    return events.emit(Event(event=EVENT, result=r.result.value, reason=summary(r), txn=r.txn,
                             bundle_version=r.new_version, slot=r.slot))


def _subdir(parent: int, name: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
        os.fsync(parent)  # the new directory's entry is durable before receipts go in it
        return os.open(name, DIR_FLAGS, dir_fd=parent)


def _write_file(dir_fd: int, name: str, data: bytes) -> None:
    temp = f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp, dir_fd=dir_fd)  # a stale one from a stick pulled mid-write
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def write_back(root_fd: int, r: Receipt) -> str:
    """Write the receipt onto the stick; returns where (relative path). OSError
    when it cannot be written (the caller says so; the outbox has it anyway)."""
    top = _subdir(root_fd, layout.TOP_DIR)
    try:
        reports = _subdir(top, layout.REPORTS_DIR)
        try:
            stem = r.file_stem()
            _write_file(reports, f"{stem}.txt", r.text().encode())
            crashpoint("media-report-half-written")
            _write_file(reports, f"{stem}.json", r.encode())  # last: its presence means both are complete
            os.fsync(reports)
        finally:
            os.close(reports)
        os.fsync(top)
    finally:
        os.close(top)
    return f"{layout.TOP_DIR}/{layout.REPORTS_DIR}/{stem}.json"


def describe_error(e: OSError) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):  # O_NOFOLLOW met a link (or a file stands there)
        return "a symbolic link or a file is in the way on the stick"
    return clean(e.strerror or e, 120)
