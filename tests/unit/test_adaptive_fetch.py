"""agent.adaptive's range plan and fetcher, on the scripted twin of the HTTP
source (agent.ranged_scripted.ScriptedRangeSource): needed payloads close together are
fetched in one bounded request, a local op's payload is never fetched, and a
payload damaged in transit is fetched again by its own range."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from agent import adaptive
from agent.ranged_scripted import Fault, FaultKind, ScriptedRangeSource
from bundler.format.ops import Op, OpType

HEAD = 100


def test_close_ranges_share_one_request_and_far_or_large_ones_do_not() -> None:
    gap = adaptive.COALESCE_GAP
    assert adaptive._runs([(0, 10), (10, 20), (20 + gap, 30 + gap)]) == [(0, 30 + gap)]
    assert adaptive._runs([(0, 10), (11 + gap, 20 + gap)]) == [(0, 10), (11 + gap, 20 + gap)]
    big = adaptive.MAX_RUN // 2 + 1
    assert adaptive._runs([(0, big), (big, 2 * big)]) == [(0, big), (big, 2 * big)]


def payload_ops(payloads: list[bytes]) -> list[Op]:
    ops, at = [], 0
    for k, p in enumerate(payloads):
        ops.append(Op(OpType.REPLACE, k * 4096, 4096, at, len(p), hashlib.sha256(p).digest(), bytes(32)))
        at += len(p)
    return ops


def test_only_needed_payloads_are_fetched_in_one_request_and_a_damaged_one_again(tmp_path: Path) -> None:
    rng = random.Random(3)
    payloads = [rng.randbytes(1000) for _ in range(3)]
    data = bytes(HEAD) + b"".join(payloads)
    ops = payload_ops(payloads)
    second = HEAD + ops[2].payload_offset
    source = ScriptedRangeSource(data, [None, Fault(FaultKind.FLIP, at=second + 5)])
    assert source.total() == len(data)
    local = tmp_path / "slot"
    local.write_bytes(bytes(8192))
    needed = [(HEAD + op.payload_offset, HEAD + op.payload_offset + op.payload_length) for op in (ops[0], ops[2])]
    decision = adaptive.Decision(bytearray([0, 1, 0]), (local,), adaptive._runs(needed), 1, 1000, 3000)

    got = [(i, p) for i, _, p in adaptive.Fetcher(source, decision, HEAD).iter_payload(ops)]

    assert [bytes(p) for i, p in got if i != 1] == [payloads[0], payloads[2]]  # type: ignore[arg-type]
    assert got[1][1] == adaptive.SlotExtent(local, ops[1].dst_offset)
    assert source.requests == [(0, 1), (HEAD, len(data)), (second, len(data))], "one run, then op 2 again"
