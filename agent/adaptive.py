"""Adaptive download: a bundle on an http(s) server read as a delta for whatever
base the device holds (the idea behind RAUC's adaptive updates and zchunk).

Owns deciding, per op, where its extent comes from, and fetching the rest by
Range. After the installer has read the head and the op table from the plain
stream, `prepare` looks at every op that carries a payload (REPLACE, DELTA):
each names the SHA-256 of the extent it produces, so when a slot of the image's
class (the booted one first, then the others: an older version, or an
interrupted earlier attempt in the target slot) holds bytes with that hash at
the op's destination offset, the op is produced from there and its payload is
never downloaded. The payloads of the other ops are fetched with Range
requests, adjacent ones coalesced into one request (gaps of at most
COALESCE_GAP bytes are read through; one request covers at most MAX_RUN bytes).

Nothing is trusted from the decision: a local extent is read again and hashed
when it is used (`LocalExtent.produce`), fetched payloads are hash-checked (a
damaged one is fetched again, up to REFETCHES times), and the installer checks
every produced extent and reads the whole image back, as for any install.

`[download] max_download_bytes` / `max_download_ratio` (docs/config.md) are
checked here, before anything is written (with `adaptive = true`, off by default): the bytes the install would download
(what was read already plus every planned range; the whole bundle when the
server ignores Range) over either limit refuse the install. A server that
ignores Range falls back to the plain stream.

Memory: one byte per op for the decisions, one (start, end) pair per range
request, one payload (<= MAX_DELTA_PAYLOAD) or extent (<= MAX_OP_DST) at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.config import DownloadConfig, SlotConfig
from agent.errors import InstallError, SourceError
from agent.plan import InstallPlan
from agent.ranged import RangeStream, ResourceChangedError, ResumableSource
from bundler.format.apply import SourceError as ExtentError
from bundler.format.apply import pread_into
from bundler.format.errors import FormatError, HashMismatchError, TruncatedError
from bundler.format.ops import Op, OpType
from bundler.format.reader import READ_CHUNK, REFETCHES, Readable

log = logging.getLogger(__name__)

COALESCE_GAP = 64 << 10  # a gap this small between two needed payloads is cheaper read than a new request
MAX_RUN = 32 << 20  # bytes one Range request covers at most
FETCH = 0  # decision byte: download the payload; k > 0: produced from candidate slot k - 1


@dataclass(frozen=True, slots=True)
class LocalExtent:
    """An op's extent, found at `offset` of a slot: read again and hash-checked when used."""

    path: Path
    offset: int

    def produce(self, op: Op, index: int) -> bytes | None:
        buf = bytearray(op.dst_length)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pread_into(fd, self.offset, memoryview(buf), str(self.path))
        finally:
            os.close(fd)
        actual = hashlib.sha256(buf).digest()
        if actual != op.dst_sha256:
            what = f"local extent of {self.path} at {self.offset} (+{op.dst_length}), changed since it was chosen"
            raise HashMismatchError(what, op.dst_sha256.hex(), actual.hex(), op_index=index)
        return bytes(buf)


Payload = memoryview | LocalExtent | None


@dataclass(slots=True)
class Decision:
    """What `prepare` decided: per op a decision byte, the ranges to fetch, the byte counts."""

    decisions: bytearray
    candidates: tuple[Path, ...]
    runs: list[tuple[int, int]]  # absolute [start, end) byte ranges of the bundle to fetch
    local_ops: int
    local_bytes: int  # payload bytes not downloaded
    fetch_bytes: int  # bytes the runs cover

    def summary(self) -> str:
        return (f"adaptive download: {self.local_ops} ops ({self.local_bytes} payload bytes) from local slots, "
                f"{self.fetch_bytes} bytes in {len(self.runs)} range requests")


def range_source(stream: Readable) -> ResumableSource | None:
    """The ranged source behind an install stream (http(s), oci://), else None."""
    ranges = getattr(stream, "range_source", None)
    return ranges if isinstance(ranges, ResumableSource) else None


def _candidates(slots: Sequence[SlotConfig], slot_class: str, booted: str) -> list[Path]:
    same = [s for s in slots if s.slot_class == slot_class]
    return [s.path for s in sorted(same, key=lambda s: s.bootname != booted)]


def _holds(path: Path, op: Op, buf: bytearray) -> bool:
    """Whether `path` holds op's extent at its destination offset (read and hashed)."""
    view = memoryview(buf)[: op.dst_length]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        pread_into(fd, op.dst_offset, view, str(path))
    except ExtentError:
        return False
    finally:
        os.close(fd)
    return hashlib.sha256(view).digest() == op.dst_sha256


def _runs(needed: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for start, end in needed:
        if runs and start - runs[-1][1] <= COALESCE_GAP and end - runs[-1][0] <= MAX_RUN:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def check_limits(limits: DownloadConfig, would: int, bundle_size: int, how: str) -> None:
    """Refuse (before anything is written) an install that would download more than configured."""
    if limits.max_download_bytes and would > limits.max_download_bytes:
        raise InstallError(f"{how} would download {would} bytes, more than [download] max_download_bytes = "
                           f"{limits.max_download_bytes}; nothing written")
    if limits.max_download_ratio and bundle_size and would > limits.max_download_ratio * bundle_size:
        raise InstallError(f"{how} would download {would} bytes, {would / bundle_size:.2f}x of the "
                           f"{bundle_size}-byte bundle, more than [download] max_download_ratio = "
                           f"{limits.max_download_ratio:g}; nothing written")


def prepare(
    ranges: ResumableSource,
    ops: Sequence[Op],
    plan: InstallPlan,
    *,
    slots: Sequence[SlotConfig],
    booted: str,
    payload_start: int,
    payload_length: int,
) -> Decision | None:
    """The decision for every op, or None when the server ignores Range (the plain
    stream goes on). Reads the candidate slots; writes nothing."""
    total = ranges.known_total
    if total is None:
        log.info("%s: the server does not say how large the bundle is; streaming it", ranges.name)
        return None
    if total != payload_start + payload_length:
        raise FormatError(f"the bundle is {total} bytes; its head says {payload_start + payload_length}",
                          region="trailer")
    try:
        with ranges.fetch(0, 1) as probe:  # the plain stream sent no Range: learn whether the server honours it
            probe.read(1)
    except SourceError as e:
        if isinstance(e, ResourceChangedError):
            raise
        log.warning("%s; streaming the whole bundle", e)
        return None
    if ranges.ranges is not True:
        log.info("%s: the server ignores Range; streaming the whole bundle", ranges.name)
        return None
    candidates: list[Path] = []
    per_class: dict[str, list[int]] = {}
    for ip in plan.images:
        paths = _candidates(slots, ip.image.slot_class, booted)
        per_class[ip.image.slot_class] = [len(candidates) + k for k in range(len(paths))]
        candidates.extend(paths)
    decisions = bytearray(len(ops))
    needed: list[tuple[int, int]] = []
    local_ops = local_bytes = 0
    buf = bytearray(max((op.dst_length for op in ops if op.payload_length), default=0))
    for index, op in enumerate(ops):
        if op.type not in (OpType.REPLACE, OpType.DELTA):
            continue
        for k in per_class[plan.image_for_op(index).image.slot_class]:
            if _holds(candidates[k], op, buf):
                decisions[index] = k + 1
                local_ops += 1
                local_bytes += op.payload_length
                break
        else:
            start = payload_start + op.payload_offset
            needed.append((start, start + op.payload_length))
    del buf
    runs = _runs(needed)
    fetch_bytes = sum(end - start for start, end in runs)
    return Decision(decisions, tuple(candidates), runs, local_ops, local_bytes, fetch_bytes)


class Fetcher:
    """Yields (index, op, payload) in table order, as `BundleReader.iter_payload`
    does, where a payload may be a `LocalExtent` (the installer produces it with
    `LocalExtent.produce`); fetched payloads come hash-checked."""

    def __init__(self, ranges: ResumableSource, decision: Decision, payload_start: int) -> None:
        self._ranges = ranges
        self._d = decision
        self._start = payload_start
        self._run = 0
        self._stream: RangeStream | None = None
        self._position = 0

    def _read(self, stream: Readable, n: int, region: str) -> bytearray:
        buf = bytearray(n)
        done = 0
        while done < n:
            chunk = stream.read(min(n - done, READ_CHUNK))
            if not chunk:
                raise TruncatedError(region, n, done)
            buf[done : done + len(chunk)] = chunk
            done += len(chunk)
        return buf

    def _seek(self, at: int) -> RangeStream:
        """The run's stream positioned at `at` (a new request when `at` is past the current run)."""
        runs = self._d.runs
        while self._stream is None or at >= runs[self._run][1]:
            if self._stream is not None:
                self._stream.close()
                self._run += 1
            start, end = runs[self._run]
            self._stream = self._ranges.fetch(start, end - start)
            self._position = start
        while self._position < at:  # a small gap inside a coalesced run
            skipped = self._stream.read(min(at - self._position, READ_CHUNK))
            if not skipped:
                raise TruncatedError("coalesced range", at - self._position, 0)
            self._position += len(skipped)
        return self._stream

    def _payload(self, index: int, op: Op) -> memoryview:
        at = self._start + op.payload_offset
        region = f"payload of op {index}"
        payload: bytearray | None = self._read(self._seek(at), op.payload_length, region)
        self._position += op.payload_length
        tries = 0
        while payload is not None and (actual := hashlib.sha256(payload).digest()) != op.payload_sha256:
            payload = None
            if tries >= REFETCHES:
                break
            tries += 1
            log.warning("%s: payload of op %d arrived damaged; fetching it again", self._ranges.name, index)
            with self._ranges.fetch(at, op.payload_length) as again:
                payload = self._read(again, op.payload_length, region)
        if payload is None:
            raise HashMismatchError("payload", op.payload_sha256.hex(), actual.hex(), op_index=index)
        view = memoryview(payload).toreadonly()
        del payload
        return view

    def iter_payload(self, ops: Sequence[Op]) -> Iterator[tuple[int, Op, Payload]]:
        try:
            for index, op in enumerate(ops):
                if op.type is OpType.ZERO or op.type is OpType.SOURCE_COPY:
                    yield index, op, None
                elif self._d.decisions[index] != FETCH:
                    yield index, op, LocalExtent(self._d.candidates[self._d.decisions[index] - 1], op.dst_offset)
                else:
                    view = self._payload(index, op)
                    yield index, op, view
                    del view
        finally:
            if self._stream is not None:
                self._stream.close()
