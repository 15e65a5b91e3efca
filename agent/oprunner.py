"""Running a bundle's ops into the target slots: several at once, within one
memory budget, each written as soon as its own checks passed.

The installer hands over the (index, op, payload) stream of the reader and two
functions: `produce` (bundler.format.apply.run_op, or a local extent's read)
and `write` (the slot writers). Each op is produced and written by a worker
thread (hashlib, zstd and zlib release the GIL, so decoding, hashing and the
writes overlap with each other and with reading the next payload). Every op
writes only its own destination range, so ops may finish in any order, with
one exception: an op that reads the target written so far (a DELTA with a
TARGET dictionary extent; `reads_target` names the ranges) starts only when
every earlier op whose destination overlaps one of those ranges is written, or
every earlier op when the ranges cannot be told. (Waiting for all of them, as
this did first, drained the workers 165 times on the ext4 corpus delta; its
wall time did not change measurably, the workers being the limit.)

Memory: `apply.op_memory` bounds what one op holds, its payload included. An
op is admitted in two steps, each when what is in flight plus what it adds
stays within BUDGET, or when nothing else is in flight: its payload is read from
the stream only when the payload fits, and the op starts when its whole bound
(computed from the payload's own records) fits. So the largest op the format
allows runs alone, as it did before ops ran concurrently, and the ops in
flight never hold more than BUDGET or that one op (docs/bundle-format.md
section 9.1). BUDGET is 8 MiB: at 16 MiB the worst legal bundle (every limit
at once, tests/component/test_worst_case_memory.py) peaked at 64-66 MiB, over the
64 MiB bound; at 8 MiB it stays near 60 MiB. Delta ops (mostly far smaller than
their 4 MiB bound) still run several at once.

Errors: after the first failure nothing new starts; the ops in flight finish
(the target is marked bad, so what they wrote is never booted) and the failure
of the lowest op index is raised. `done` runs on the calling thread, in the
order ops finish (progress, crash points, cancellation).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

from bundler.format.apply import op_memory
from bundler.format.ops import Buffer, Op, OpType

P = TypeVar("P")
Extent = bytes | bytearray | None

WORKERS = max(2, min(4, os.cpu_count() or 1))
BUDGET = 8 << 20  # bytes of op_memory in flight at once


class OpRunner(Generic[P]):
    def __init__(
        self,
        *,
        produce: Callable[[int, Op, P], Extent],
        write: Callable[[int, Op, Extent], None],
        done: Callable[[int, Op], None],
        reads_target: Callable[[int, Op, P], Sequence[tuple[int, int]] | None],
        advise: Callable[[int, Op, P], None] | None = None,
        workers: int = WORKERS,
        budget: int = BUDGET,
    ) -> None:
        self._produce = produce
        self._write = write
        self._done = done
        self._reads_target = reads_target
        self._advise = advise
        self._workers = workers
        self._budget = budget
        self._flight: dict[Future[None], tuple[int, Op, int]] = {}
        self._used = 0
        self._errors: list[tuple[int, BaseException]] = []
        self._stopping = False  # after a failure: ops in flight finish, nothing more is reported done

    def _job(self, index: int, op: Op, payload: P) -> None:
        extent = self._produce(index, op, payload)
        del payload  # the payload goes before the extent is written
        self._write(index, op, extent)

    def _reap(self, *, block: bool) -> None:
        if not self._flight:
            return
        finished, _ = wait(list(self._flight), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in sorted(finished, key=lambda f: self._flight[f][0]):
            index, op, cost = self._flight.pop(future)
            self._used -= cost
            error = future.exception()
            if error is not None:
                self._errors.append((index, error))
            elif not self._errors and not self._stopping:
                self._done(index, op)

    def _wait_for(self, cost: int, holding: int = 0) -> None:
        """Until `cost` more bytes fit the budget (with `holding` already held here), or
        nothing is in flight, or an op failed."""
        while self._flight and not self._errors and self._used + holding + cost > self._budget:
            self._reap(block=True)

    def _drain(self) -> None:
        while self._flight:
            self._reap(block=True)

    def _settle(self, ranges: Sequence[tuple[int, int]] | None) -> None:
        """Until no op in flight writes into `ranges` (every op when None), or an op failed."""
        if ranges is None:
            self._drain()
            return
        if not ranges:
            return
        while not self._errors and any(
            op.dst_offset < offset + length and offset < op.dst_offset + op.dst_length
            for _, op, _ in self._flight.values()
            for offset, length in ranges
        ):
            self._reap(block=True)

    def run(self, items: Iterator[tuple[int, Op, P]], ops: Sequence[Op]) -> None:
        """Run every op of `items` (the reader's stream, in table order over `ops`),
        then let the stream check its end."""
        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="op") as pool:
            try:
                self._run(pool, items, ops)
            except BaseException:
                self._stopping = True
                self._drain()  # an error (or cancellation) leaves no op running behind it
                raise
            self._stopping = True
            self._drain()
        if self._errors:
            raise min(self._errors, key=lambda e: e[0])[1]

    def _run(self, pool: ThreadPoolExecutor, items: Iterator[tuple[int, Op, P]], ops: Sequence[Op]) -> None:
        for expected in range(len(ops)):
            # Admitted in two steps: room for the payload before it is read, then room
            # for everything the op holds, bounded with the payload's own records.
            reading = ops[expected].payload_length
            self._wait_for(reading)
            if self._errors:
                return
            self._used += reading
            index, op, payload = next(items)  # reads (and hash-checks) the payload
            self._used -= reading
            if index != expected:
                raise RuntimeError(f"op {index} arrived where op {expected} was expected")
            cost = op_memory(op, payload if isinstance(payload, Buffer) else None)
            self._wait_for(cost - reading, holding=reading)
            if self._errors:
                return
            self._settle(self._reads_target(index, op, payload))
            if self._errors:
                return
            if op.type is OpType.ZERO:
                self._write(index, op, None)  # a hole or BLKZEROOUT: nothing to wait for
                self._done(index, op)
                continue
            if self._advise is not None:
                self._advise(index, op, payload)
            future = pool.submit(self._job, index, op, payload)
            del payload
            self._flight[future] = (index, op, cost)
            self._used += cost
            self._reap(block=False)
        self._drain()
        if not self._errors:
            for index, _, _ in items:  # the stream checks that nothing follows the last payload
                raise RuntimeError(f"op {index} beyond the op table")
