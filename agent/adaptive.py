"""Adaptive download: a bundle on an http(s) server read as a delta for whatever
base the device holds (the idea behind RAUC's adaptive updates and zchunk).

Owns deciding, per op, where its extent comes from, and fetching the rest by
Range. After the installer has read the head and the op table from the plain
stream, `prepare` decides for every op that carries a payload (REPLACE, DELTA).
With a block index in the bundle (docs/bundle-format.md section 7.2), it
fetches the index with one Range request and `agent.blockmatch` looks for every
4 KiB block of every REPLACE op anywhere in the slots of the image's class (the
booted one first, then the others: an older version, or an interrupted earlier
attempt in the target slot): an op all of whose blocks were found is produced
from them (`Fetcher` reads them again and checks the op's SHA-256; on a
mismatch it fetches that op's payload instead). Without an index, and for
DELTA ops, an op is produced locally when a slot holds bytes with its
`dst_sha256` at the op's own destination offset. The payloads of the other ops are fetched with Range
requests, adjacent ones coalesced into one request (gaps of at most
`[download] coalesce_gap` bytes, default COALESCE_GAP, are read through; one
request covers at most MAX_RUN bytes).

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
request, one payload (<= MAX_DELTA_PAYLOAD) or extent (<= MAX_OP_DST) at a time;
with a block index, 8 bytes per block for the locations (the index itself and
the match table are freed before the first write; agent.blockmatch).
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import blockmatch
from agent.config import DownloadConfig, SlotConfig
from agent.errors import InstallError, SourceError
from agent.plan import InstallPlan
from agent.ranged import RangeStream, ResourceChangedError, ResumableSource
from bundler.format.apply import SourceError as ExtentError
from bundler.format.apply import pread_into
from bundler.format.blockindex import BLOCK, HASH_LENGTH, op_blocks
from bundler.format.errors import FormatError, HashMismatchError, TruncatedError
from bundler.format.manifest import BlockIndexRef
from bundler.format.ops import Op, OpType
from bundler.format.reader import READ_CHUNK, REFETCHES, Readable, read_into

log = logging.getLogger(__name__)

COALESCE_GAP = 64 << 10  # a gap this small between two needed payloads is cheaper read than a new request
MAX_RUN = 32 << 20  # bytes one Range request covers at most
FETCH = 0  # decision byte: download the payload; k > 0: produced from candidate slot k - 1
BLOCKS = 255  # decision byte: produced from blocks found anywhere in the candidate slots


class LocalExtent(ABC):
    """An op's extent held locally; `produce` returns it hash-checked (the installer
    calls it for every payload of this kind)."""

    __slots__ = ()

    @abstractmethod
    def produce(self, op: Op, index: int) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class SlotExtent(LocalExtent):
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


class Assembled(LocalExtent):
    """An op's extent put together from local blocks, already checked against dst_sha256."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def produce(self, op: Op, index: int) -> bytes | None:
        data, self.data = self.data, b""  # hand over the only reference
        if len(data) != op.dst_length:
            raise FormatError(f"op {index}: assembled extent of {len(data)} bytes, op has {op.dst_length}",
                              region="payload")
        return data


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
    locations: array[int] | None = None  # per REPLACE block (block index order): agent.blockmatch location
    index_bytes: int = 0  # bytes of the block index fetched
    read_bytes: int = 0  # bytes of slots read to match blocks

    def summary(self) -> str:
        index = (f"; block index of {self.index_bytes} bytes matched against {self.read_bytes} bytes of slots"
                 if self.locations is not None else "")
        return (f"adaptive download: {self.local_ops} ops ({self.local_bytes} payload bytes) from local slots, "
                f"{self.fetch_bytes} bytes in {len(self.runs)} range requests{index}")


def honours_range(ranges: ResumableSource, otherwise: str) -> bool:
    """Whether the server honours Range (one 1-byte probe: the plain stream sent none);
    when not, says so and that the install goes on `otherwise`."""
    try:
        with ranges.fetch(0, 1) as probe:
            probe.read(1)
    except SourceError as e:
        if isinstance(e, ResourceChangedError):
            raise
        log.warning("%s; %s", e, otherwise)
        return False
    if ranges.ranges is not True:
        log.info("%s: the server ignores Range; %s", ranges.name, otherwise)
        return False
    return True


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


def _runs(needed: Sequence[tuple[int, int]], gap: int = COALESCE_GAP) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for start, end in needed:
        if runs and start - runs[-1][1] <= gap and end - runs[-1][0] <= MAX_RUN:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def check_limits(limits: DownloadConfig, would: int, bundle_size: int, how: str, *, written: bool = False) -> None:
    """Refuse an install that would download more than configured: before anything
    is written, or (`written`) mid-install, where the target slot stays unbootable."""
    outcome = "the target slot stays unbootable" if written else "nothing written"
    if limits.max_download_bytes and would > limits.max_download_bytes:
        raise InstallError(f"{how} would download {would} bytes, more than [download] max_download_bytes = "
                           f"{limits.max_download_bytes}; {outcome}")
    if limits.max_download_ratio and bundle_size and would > limits.max_download_ratio * bundle_size:
        raise InstallError(f"{how} would download {would} bytes, {would / bundle_size:.2f}x of the "
                           f"{bundle_size}-byte bundle, more than [download] max_download_ratio = "
                           f"{limits.max_download_ratio:g}; {outcome}")


def prepare(
    ranges: ResumableSource,
    ops: Sequence[Op],
    plan: InstallPlan,
    *,
    slots: Sequence[SlotConfig],
    booted: str,
    payload_start: int,
    payload_length: int,
    block_index: BlockIndexRef | None = None,
    coalesce_gap: int = COALESCE_GAP,
) -> Decision | None:
    """The decision for every op, or None when the server ignores Range (the plain
    stream goes on). Reads the candidate slots (and, with a `block_index`, the
    index by Range); writes nothing."""
    total = ranges.known_total
    if total is None:
        log.info("%s: the server does not say how large the bundle is; streaming it", ranges.name)
        return None
    if total != payload_start + payload_length:
        raise FormatError(f"the bundle is {total} bytes; its head says {payload_start + payload_length}",
                          region="trailer")
    if not honours_range(ranges, "streaming the whole bundle"):
        return None
    candidates: list[Path] = []
    per_class: dict[str, list[int]] = {}
    for ip in plan.images:
        paths = _candidates(slots, ip.image.slot_class, booted)
        paths.sort(key=ip.slot.path.__eq__)  # the slot being written last: its blocks are usable only ahead
        per_class[ip.image.slot_class] = [len(candidates) + k for k in range(len(paths))]
        candidates.extend(paths)
    locations = None
    index_bytes = read_bytes = 0
    if block_index is not None:
        index_bytes = block_index.length
        groups = []
        first = 0
        targets = {ip.slot.path for ip in plan.images}
        for ip in sorted(plan.images, key=lambda ip: ip.image.op_first):  # block ordinals follow the op table
            image_ops = ops[ip.image.op_first : ip.image.op_first + ip.image.op_count]
            starts = blockmatch.op_starts(image_ops)
            groups.append(blockmatch.Group(first, len(starts), tuple(per_class[ip.image.slot_class]), starts))
            first += len(starts)
        cands = [blockmatch.Candidate(p, p in targets) for p in candidates]
        locations, read_bytes = _match(ranges, payload_start, block_index, blocks=first,
                                         groups=groups, candidates=cands)
        del groups
    decisions = bytearray(len(ops))
    needed: list[tuple[int, int]] = []
    local_ops = local_bytes = 0
    buf = bytearray(max((op.dst_length for op in ops if op.payload_length), default=0))
    ordinal = 0
    for index, op in enumerate(ops):
        if op.type not in (OpType.REPLACE, OpType.DELTA):
            continue
        blocks = op_blocks(op) if locations is not None else 0
        if blocks:
            if all(locations[k] != blockmatch.NOWHERE for k in range(ordinal, ordinal + blocks)):  # type: ignore[index]
                decisions[index] = BLOCKS
            ordinal += blocks
        else:
            for k in per_class[plan.image_for_op(index).image.slot_class]:
                if _holds(candidates[k], op, buf):
                    decisions[index] = k + 1
                    break
        if decisions[index] != FETCH:
            local_ops += 1
            local_bytes += op.payload_length
        else:
            start = payload_start + op.payload_offset
            needed.append((start, start + op.payload_length))
    del buf
    runs = _runs(needed, coalesce_gap)
    fetch_bytes = sum(end - start for start, end in runs)
    return Decision(decisions, tuple(candidates), runs, local_ops, local_bytes, fetch_bytes, locations,
                    index_bytes, read_bytes)


def _match(
    ranges: ResumableSource, payload_start: int, ref: BlockIndexRef, *, blocks: int,
    groups: Sequence[blockmatch.Group], candidates: Sequence[blockmatch.Candidate],
) -> tuple[array[int], int]:
    """agent.blockmatch over the index fetched by Range a window at a time (one request
    each), hashed as it arrives and checked against the manifest's SHA-256 once all of it
    was used (entries are only hints; nothing is written before this check). A damaged
    index is fetched and matched again, up to REFETCHES times."""
    for tries in range(REFETCHES + 1):
        h = hashlib.sha256()

        def load(first: int, count: int, h: hashlib._Hash = h) -> array[int]:
            at = payload_start + ref.offset + HASH_LENGTH * first
            with ranges.fetch(at, HASH_LENGTH * count) as stream:
                raw = read_exact(stream, HASH_LENGTH * count, "block index")
            h.update(raw)
            return blockmatch.entries(raw)

        locations, read = blockmatch.match(load, blocks, groups, candidates)
        actual = h.hexdigest()
        if actual == ref.sha256:
            return locations, read
        del locations
        if tries < REFETCHES:
            log.warning("%s: the block index arrived damaged; fetching it again", ranges.name)
    raise HashMismatchError("block index", ref.sha256, actual)


def read_exact(stream: Readable, n: int, region: str) -> bytearray:
    buf = bytearray(n)
    read_into(stream, memoryview(buf), region)
    return buf


class Fetcher:
    """Yields (index, op, payload) in table order, as `BundleReader.iter_payload`
    does, where a payload may be a `LocalExtent` (the installer produces it with
    `LocalExtent.produce`); fetched payloads come hash-checked."""

    def __init__(self, ranges: ResumableSource, decision: Decision, payload_start: int,
                 limit: Callable[[int], None] | None = None) -> None:
        self._ranges = ranges
        self._d = decision
        self._start = payload_start
        self._limit = limit  # called with the bytes the install would download in all, before a refetch
        self._extra = 0  # payload bytes fetched beyond the decision (ops whose local blocks changed)
        self._run = 0
        self._stream: RangeStream | None = None
        self._position = 0
        self._fds: dict[int, int] = {}  # candidate index -> open fd (assembling from blocks)
        self.refetched = 0  # ops whose local blocks had changed: their payloads were fetched after all

    def _fd(self, candidate: int) -> int:
        fd = self._fds.get(candidate)
        if fd is None:
            fd = self._fds[candidate] = os.open(self._d.candidates[candidate], os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def _assemble(self, index: int, op: Op, ordinal: int) -> bytes | None:
        """The op's extent from its blocks where matching found them (runs of blocks
        contiguous in one slot read at once), or None when a slot no longer holds them."""
        assert self._d.locations is not None
        buf = bytearray(op.dst_length)
        view = memoryview(buf)
        done = 0
        k = ordinal
        try:
            while done < op.dst_length:
                candidate, at = blockmatch.split(self._d.locations[k])
                n = min(BLOCK, op.dst_length - done)
                k += 1
                while done + n < op.dst_length:  # extend the run while the next block follows on
                    c2, at2 = blockmatch.split(self._d.locations[k])
                    if c2 != candidate or at2 != at + n:
                        break
                    n += min(BLOCK, op.dst_length - done - n)
                    k += 1
                pread_into(self._fd(candidate), at, view[done : done + n], str(self._d.candidates[candidate]))
                done += n
        except (OSError, ExtentError) as e:
            log.warning("op %d: reading its local blocks: %s", index, e)
            return None
        finally:
            view.release()
        if hashlib.sha256(buf).digest() != op.dst_sha256:
            return None
        return bytes(buf)

    def _read(self, stream: Readable, n: int, region: str) -> bytearray:
        return read_exact(stream, n, region)

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

    def _fetch_alone(self, index: int, op: Op) -> memoryview:
        """An op planned as local whose blocks changed since: its payload, by a request of its own."""
        at = self._start + op.payload_offset
        log.warning("%s: op %d: its local blocks do not make its extent (a slot changed since they were "
                    "matched, or the block index is wrong); fetching its payload", self._ranges.name, index)
        self.refetched += 1
        self._extra += op.payload_length
        if self._limit is not None:
            self._limit(self._extra)
        with self._ranges.fetch(at, op.payload_length) as stream:
            payload = self._read(stream, op.payload_length, f"payload of op {index}")
        actual = hashlib.sha256(payload).digest()
        if actual != op.payload_sha256:
            raise HashMismatchError("payload", op.payload_sha256.hex(), actual.hex(), op_index=index)
        return memoryview(payload).toreadonly()

    def iter_payload(self, ops: Sequence[Op]) -> Iterator[tuple[int, Op, Payload]]:
        ordinal = 0  # block index ordinal of the next REPLACE op
        try:
            for index, op in enumerate(ops):
                blocks = op_blocks(op) if self._d.locations is not None else 0
                decision = self._d.decisions[index]
                if op.type is OpType.ZERO or op.type is OpType.SOURCE_COPY:
                    yield index, op, None
                elif decision == BLOCKS:
                    data = self._assemble(index, op, ordinal)
                    if data is None:
                        view = self._fetch_alone(index, op)
                        yield index, op, view
                        del view
                    else:
                        yield index, op, Assembled(data)
                        del data
                elif decision != FETCH:
                    yield index, op, SlotExtent(self._d.candidates[decision - 1], op.dst_offset)
                else:
                    view = self._payload(index, op)
                    yield index, op, view
                    del view
                ordinal += blocks
        finally:
            if self._stream is not None:
                self._stream.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
