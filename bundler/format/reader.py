"""Reading a bundle front to back from a byte stream (sans-IO: any object with
``read(n)``; sources own sockets and files).

Order of trust, matching invariant 1 of docs/architecture.md:
1. `read_head()` reads the header (bounds-checked lengths only), the manifest
   and signature bytes → `UnverifiedBundle`;
2. `signing.verify()` checks the signature, then parses the manifest;
3. `read_op_table()` reads the op table, checks it against the manifest's hash,
   then validates its structure;
4. `iter_payload()` yields each op's payload only after its hash matched.
Running an op (source reads, decompression, the produced-extent hash check)
is `bundler.format.apply.apply_op()`.

A stream that can read a range again (`refetch(offset, length) -> Readable`,
an HTTP source) gets a damaged op table or op payload fetched again, up to
REFETCHES times, before the hash mismatch is an error; the header, manifest
and signatures are not hashed before the signature check, so damage there
fails the signature check (never retried).

Memory: a region is read in chunks of at most READ_CHUNK bytes into one buffer
of its final size (never a list of chunks joined into a second copy), and the
reader keeps no reference to a payload once it has been yielded, so what is
resident is what docs/bundle-format.md section 9.1 counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Protocol

from bundler.format.blockindex import check_index
from bundler.format.embedded import check_sections, table_length
from bundler.format.errors import BoundsError, FormatError, HashMismatchError, TruncatedError
from bundler.format.header import HEADER_SIZE, MAX_DELTA_OPS, Header
from bundler.format.manifest import BlockIndexRef, EmbeddedDeltaRef
from bundler.format.ops import MAX_DELTA_PAYLOAD, Op, OpTable, OpType, unpack_table, validate_image_ops
from bundler.format.signing import UnverifiedBundle, VerifiedBundle

READ_CHUNK = 256 << 10
REFETCHES = 3  # times a damaged op table or payload is fetched again (from a stream that can)


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def read_into(stream: Readable, into: memoryview, region: str) -> None:
    """Fill `into` by reads of at most READ_CHUNK; a stream that ends early is truncated,
    one that returns more than was asked for is refused."""
    n, done = len(into), 0
    while done < n:
        chunk = stream.read(min(n - done, READ_CHUNK))
        if not chunk:
            raise TruncatedError(region, n, done)
        if len(chunk) > n - done:
            raise FormatError(f"stream returned {len(chunk)} bytes, {n - done} were asked for", region=region)
        into[done : done + len(chunk)] = chunk
        done += len(chunk)


class BundleReader:
    def __init__(self, stream: Readable) -> None:
        self._stream = stream
        self.position = 0
        self.block_index: BlockIndexRef | None = None  # set by read_op_table
        self.embedded: tuple[EmbeddedDeltaRef, ...] = ()  # set by read_op_table

    def _read_into(self, n: int, region: str, stream: Readable | None = None) -> bytearray:
        """Exactly n bytes (n already bounded by the caller) in one buffer (`read_into`)."""
        buf = bytearray(n)
        read_into(stream or self._stream, memoryview(buf), region)
        if stream is None:
            self.position += n
        return buf

    def _again(self, start: int, n: int, region: str, tries: int) -> bytearray | None:
        """The region start..start+n fetched again, or None when the stream cannot (any more)."""
        refetch = getattr(self._stream, "refetch", None)
        if refetch is None or not getattr(self._stream, "can_refetch", True) or tries >= REFETCHES:
            return None
        again = refetch(start, n)
        try:
            return self._read_into(n, region, again)
        finally:
            close = getattr(again, "close", None)
            if close is not None:
                close()

    def _read_exact(self, n: int, region: str) -> bytes:
        return bytes(self._read_into(n, region))  # small regions only: header, manifest, signatures

    def read_head(self) -> UnverifiedBundle:
        raw_header = self._read_exact(HEADER_SIZE, "header")
        header = Header.unpack(raw_header)
        manifest = self._read_exact(header.manifest_length, "manifest")
        signatures = self._read_exact(header.signature_length, "signatures")
        return UnverifiedBundle(header, raw_header, manifest, signatures)

    def read_op_table(self, bundle: VerifiedBundle) -> OpTable:
        start, n = self.position, bundle.header.op_table_length
        count = bundle.header.op_count
        if count > MAX_DELTA_OPS and any(im.base_sha256 is not None for im in bundle.manifest.images):
            # Checked before the table is read: a device holds at most this many next to DELTA ops.
            raise BoundsError("op_count of a delta bundle", count, 1, MAX_DELTA_OPS, region="header")
        raw: bytearray | None = self._read_into(n, "op table")
        tries = 0
        while raw is not None and (actual := hashlib.sha256(raw).hexdigest()) != bundle.manifest.op_table_sha256:
            raw = self._again(start, n, "op table", tries)
            tries += 1
        if raw is None:
            raise HashMismatchError("op table", bundle.manifest.op_table_sha256, actual)
        ops = unpack_table(raw)
        cursor = 0
        next_op = 0
        for i, image in enumerate(bundle.manifest.images):
            if image.op_first != next_op:
                raise FormatError(f"image {i} ops start at {image.op_first}, expected {next_op}", region="manifest")
            end = image.op_first + image.op_count
            cursor = validate_image_ops(ops[image.op_first : end], image.op_first, image.size, cursor, image.base_size)
            next_op = end
        if next_op != len(ops):
            raise FormatError(f"images use {next_op} of {len(ops)} ops", region="manifest")
        index = bundle.manifest.block_index
        embedded = bundle.manifest.embedded_deltas
        if index is not None:
            # With embedded deltas the index ends where the first of them starts (check_sections).
            end = index.offset + index.length if embedded else bundle.manifest.payload_length
            check_index(ops, index.offset, index.length, cursor, end)
            cursor += index.length
        if embedded:
            cursor = check_sections(bundle.manifest.images, embedded, cursor, bundle.manifest.payload_length)
        self.block_index = index
        self.embedded = embedded
        if cursor != bundle.manifest.payload_length:
            raise FormatError(
                f"ops reference {cursor} payload bytes, manifest says {bundle.manifest.payload_length}",
                region="op table",
            )
        return ops

    def iter_payload(self, ops: Sequence[Op]) -> Iterator[tuple[int, Op, memoryview | None]]:
        """Yield (index, op, payload) in table order; payload is None for ops without
        one (ZERO, SOURCE_COPY), else a read-only view of exactly the bytes whose
        SHA-256 was checked.
        Call only with the table `read_op_table` returned (it checked the lengths).
        After the last op the stream must end."""
        for index, op in enumerate(ops):
            if op.type is OpType.ZERO or op.type is OpType.SOURCE_COPY:
                yield index, op, None
                continue
            if not 0 < op.payload_length <= MAX_DELTA_PAYLOAD:  # read_op_table checked it; never allocate more
                raise BoundsError("payload_length", op.payload_length, 1, MAX_DELTA_PAYLOAD, region=f"op {index}")
            start, region = self.position, f"payload of op {index}"
            payload: bytearray | None = self._read_into(op.payload_length, region)
            tries = 0
            while payload is not None and (actual := hashlib.sha256(payload).digest()) != op.payload_sha256:
                payload = None  # never two payloads in memory
                payload = self._again(start, op.payload_length, region, tries)
                tries += 1
            if payload is None:
                raise HashMismatchError("payload", op.payload_sha256.hex(), actual.hex(), op_index=index)
            view = memoryview(payload).toreadonly()
            del payload
            yield index, op, view
            del view  # do not hold this payload while the next one is read
        if self.block_index is not None:
            self._skip_index(self.block_index)
        for k, ref in enumerate(self.embedded):
            self._skip_hashed(table_length(ref), ref.table_sha256, f"embedded delta {k} op table")
            self._skip_hashed(ref.payload_length, ref.payload_sha256, f"embedded delta {k} payload")
        if self._stream.read(1):
            raise FormatError("data after the end of the payload", region="trailer")

    def _skip_index(self, index: BlockIndexRef) -> None:
        """Read the block index after the last op payload (a streaming install has no use
        for it) and check its hash: every byte of a bundle is checked. Held a piece at a time."""
        self._skip_hashed(index.length, index.sha256, "block index")

    def _skip_hashed(self, length: int, digest: str, region: str) -> None:
        """Read `length` bytes a piece at a time (a streaming install has no use for the
        block index or the embedded deltas) and check them against the manifest's SHA-256."""
        h = hashlib.sha256()
        left = length
        while left:
            chunk = self._stream.read(min(left, READ_CHUNK))
            if not chunk:
                raise TruncatedError(region, length, length - left)
            if len(chunk) > left:
                raise FormatError(f"stream returned {len(chunk)} bytes, {left} were asked for", region=region)
            h.update(chunk)
            left -= len(chunk)
        self.position += length
        if h.hexdigest() != digest:
            raise HashMismatchError(region, digest, h.hexdigest())
