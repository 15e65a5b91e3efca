"""Every way a bundle is refused, on a simulated device, through the CLI.

Each refusal must exit non-zero with one error line naming the reason (no
traceback), leave the booted slot's file and the bootloader's entry for it
byte-for-byte as they were, and be recorded as the last result and in the
outbox. Refusals decided before the payload (signature, policy, truncated or
corrupt head and op table) change neither slot nor the bootloader state at
all. Corruption found while streaming the payload may have written part of
the target slot, so that slot must be left marked bad (never bootable with
partial contents) and the booted slot must stay primary.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bundler.format.header import HEADER_SIZE, Header
from bundler.format.ops import OpType, unpack_table
from tests.e2e._sim import SimDevice, Snapshot
from tests.e2e.conftest import BundleFactory, Images, KeyPair

PAST = datetime(2020, 1, 1, tzinfo=UTC)
FUTURE = datetime(2099, 1, 1, tzinfo=UTC)


# --- bundle surgery --------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    header: Header
    replace_ops: list[tuple[int, int, int]]  # (op index, payload start in file, payload length)

    @property
    def size(self) -> int:
        return self.header.total_length

    @property
    def ops_end(self) -> int:
        """Where the last op payload ends (the block index, if any, follows)."""
        _, start, n = self.replace_ops[-1]
        return start + n


def layout(bundle: Path) -> Layout:
    raw = bundle.read_bytes()
    header = Header.unpack(raw[:HEADER_SIZE])
    ops = unpack_table(raw[header.op_table_offset : header.payload_offset])
    replace = [
        (i, header.payload_offset + op.payload_offset, op.payload_length)
        for i, op in enumerate(ops)
        if op.type is OpType.REPLACE
    ]
    return Layout(header, replace)


def flip(bundle: Path, offset: int, out: Path) -> Path:
    data = bytearray(bundle.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def cut(bundle: Path, length: int, out: Path) -> Path:
    out.write_bytes(bundle.read_bytes()[:length])
    return out


# --- assertions ------------------------------------------------------------


def without_last_result(snap: Snapshot) -> dict[str, Any]:
    return {k: v for k, v in snap.agent_state().items() if k != "last_result"}


def assert_recorded(dev: SimDevice, outbox_before: int, reason: str) -> None:
    """The refusal is the last result and exactly one new failure in the outbox."""
    last = dev.status()["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert reason in last["reason"]
    failures = [e for e in dev.outbox()[outbox_before:] if e["result"] == "failed"]
    assert failures == [last]


def refuse(dev: SimDevice, bundle: Path, reason: str, *extra: str) -> str:
    run = dev.install(bundle, *extra)
    line = run.one_error_line()
    assert reason in line, line
    return line


def assert_refused_untouched(dev: SimDevice, bundle: Path, reason: str) -> None:
    """Refused before the payload: slots, bootloader and slot records unchanged."""
    before = dev.snapshot()
    outbox_before = len(dev.outbox())
    refuse(dev, bundle, reason)
    after = dev.snapshot()
    assert after.slot("A") == before.slot("A")
    assert after.slot("B") == before.slot("B")
    assert after.bootloader == before.bootloader
    assert without_last_result(after) == without_last_result(before)
    assert_recorded(dev, outbox_before, reason)


def assert_refused_target_unbootable(dev: SimDevice, bundle: Path, reason: str) -> None:
    """Refused while streaming: the target may be partly written but is marked bad."""
    before = dev.snapshot()
    outbox_before = len(dev.outbox())
    booted = dev.status()["booted"]
    target = "B" if booted == "A" else "A"
    refuse(dev, bundle, reason)
    after = dev.snapshot()
    assert after.slot(booted) == before.slot(booted)
    old, new = before.boot_doc(), after.boot_doc()
    assert new["slots"][booted] == old["slots"][booted]
    assert new["last_good"] == old["last_good"] == booted
    assert new["slots"][target]["state"] == "bad"
    doc = dev.status()
    assert doc["booted"] == booted
    assert doc["primary"] == booted
    assert doc["slots"][target]["bootable"] is False
    assert doc["slots"][target]["version"] is None  # no claim about what the slot holds now
    assert doc["committed_security_version"] == before.agent_state()["committed_security_version"]
    assert_recorded(dev, outbox_before, reason)


# --- signature --------------------------------------------------------------


def test_rejects_bundle_signed_by_unknown_key_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory, other_key: KeyPair
) -> None:
    assert_refused_untouched(device, make_bundle("2.0", key=other_key), "none of which is in the keyring")


def test_rejects_bundle_whose_manifest_changed_after_signing_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle("2.0")
    h = layout(bundle).header
    tampered = flip(bundle, h.manifest_offset + h.manifest_length // 2, tmp_path / "tampered.otab")
    assert_refused_untouched(device, tampered, "signature does not match")


@pytest.mark.parametrize(
    ("where", "reason"),
    [("key id", "none of which is in the keyring"), ("signature", "signature does not match")],
)
def test_rejects_bundle_with_corrupt_signature_block_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path, where: str, reason: str
) -> None:
    bundle = make_bundle("2.0")
    h = layout(bundle).header
    # block: u16 count, then u8 alg, 3 reserved, 32-byte key id, 64-byte signature
    offset = h.signature_offset + 2 + 4 + (5 if where == "key id" else 32 + 40)
    assert_refused_untouched(device, flip(bundle, offset, tmp_path / "sig.otab"), reason)


# --- policy -----------------------------------------------------------------


def test_rejects_bundle_for_another_compatible_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory
) -> None:
    bundle = make_bundle("2.0", compatible="other-board")
    assert_refused_untouched(device, bundle, "bundle is for compatible 'other-board'")


def test_rejects_security_version_below_the_committed_one_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    device.install_ok(make_bundle("2.0", security_version=5))
    device.boot()
    assert device.status()["committed_security_version"] == 5
    older = make_bundle("3.0", security_version=4, image=images.v3)
    assert_refused_untouched(device, older, "security version 4 is below the committed security version 5")
    assert device.status()["booted"] == "B"


def test_allow_downgrade_installs_a_lower_security_version(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    device.install_ok(make_bundle("2.0", security_version=5))
    device.boot()
    run = device.install(make_bundle("3.0", security_version=4, image=images.v3), "--allow-downgrade")
    assert run.rc == 0, run.err
    assert device.status()["slots"]["A"]["version"] == "3.0"


def test_rejects_expired_bundle_and_leaves_slots_untouched(device: SimDevice, make_bundle: BundleFactory) -> None:
    assert_refused_untouched(device, make_bundle("2.0", expires=PAST), "bundle expired at 2020-01-01T00:00:00Z")


def test_accepts_bundle_that_expires_in_the_future(device: SimDevice, make_bundle: BundleFactory) -> None:
    device.install_ok(make_bundle("2.0", expires=FUTURE))
    assert device.status()["slots"]["B"]["version"] == "2.0"


# --- truncation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("region", "reason"),
    [
        ("empty", "header: truncated"),
        ("header", "header: truncated"),
        ("manifest", "manifest: truncated"),
        ("signatures", "signatures: truncated"),
        ("op table", "op table: truncated"),
    ],
)
def test_rejects_bundle_truncated_before_the_payload_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path, region: str, reason: str
) -> None:
    bundle = make_bundle("2.0")
    h = layout(bundle).header
    length = {
        "empty": 0,
        "header": HEADER_SIZE // 2,
        "manifest": h.manifest_offset + h.manifest_length // 2,
        "signatures": h.signature_offset + h.signature_length - 1,
        "op table": h.op_table_offset + h.op_table_length - 1,
    }[region]
    assert_refused_untouched(device, cut(bundle, length, tmp_path / "cut.otab"), reason)


@pytest.mark.parametrize("where", ["no payload at all", "middle of the payload", "last byte missing"])
def test_rejects_bundle_truncated_in_the_payload_and_leaves_target_unbootable(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path, where: str
) -> None:
    bundle = make_bundle("2.0")
    lay = layout(bundle)
    if where == "last byte missing":
        length, op = lay.ops_end - 1, lay.replace_ops[-1][0]
    elif where == "no payload at all":
        length, op = lay.header.payload_offset, 0
    else:
        length = lay.header.payload_offset + lay.header.payload_length // 2
        op = next(i for i, start, n in lay.replace_ops if start <= length < start + n)
        assert op > 0  # earlier ops were written before the cut
    truncated = cut(bundle, length, tmp_path / "cut.otab")
    assert_refused_target_unbootable(device, truncated, f"payload of op {op}: truncated")


# --- corruption ---------------------------------------------------------------


def test_rejects_bundle_with_bad_magic_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    assert_refused_untouched(device, flip(make_bundle("2.0"), 1, tmp_path / "magic.otab"), "bad magic")


def test_rejects_bundle_with_corrupt_op_table_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle("2.0")
    h = layout(bundle).header
    corrupt = flip(bundle, h.op_table_offset + 128 + 9, tmp_path / "optable.otab")  # op 1's dst_offset
    assert_refused_untouched(device, corrupt, "op table hash mismatch")


@pytest.mark.parametrize("which", ["first", "last"])
def test_rejects_corrupt_op_payload_and_leaves_target_unbootable(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path, which: str
) -> None:
    bundle = make_bundle("2.0")
    op, start, length = layout(bundle).replace_ops[0 if which == "first" else -1]
    corrupt = flip(bundle, start + length // 2, tmp_path / "payload.otab")
    assert_refused_target_unbootable(device, corrupt, f"op {op}: payload hash mismatch")


def test_rejects_trailing_garbage_and_leaves_target_unbootable(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle("2.0")
    padded = tmp_path / "padded.otab"
    padded.write_bytes(bundle.read_bytes() + b"\x00garbage")
    assert_refused_target_unbootable(device, padded, "data after the end of the payload")


def test_target_left_unbootable_by_a_failed_install_takes_the_next_good_install(
    device: SimDevice, make_bundle: BundleFactory, images: Images, tmp_path: Path
) -> None:
    bundle = make_bundle("2.0")
    lay = layout(bundle)
    refuse(device, cut(bundle, lay.size - 1, tmp_path / "cut.otab"), "truncated")
    device.install_ok(bundle)
    device.boot()
    doc = device.status()
    assert (doc["booted"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "good", "2.0")
    assert device.slot_image_sha256("B", images.v2.size) == images.v2.sha256


# --- reporting ----------------------------------------------------------------


def test_every_refusal_is_recorded_in_order_and_none_is_lost(
    device: SimDevice, make_bundle: BundleFactory, other_key: KeyPair, tmp_path: Path
) -> None:
    bundle = make_bundle("2.0")
    lay = layout(bundle)
    cases = [
        (make_bundle("2.0", key=other_key), "none of which is in the keyring"),
        (make_bundle("2.0", compatible="other-board"), "bundle is for compatible"),
        (make_bundle("2.0", expires=PAST), "bundle expired"),
        (cut(bundle, lay.header.op_table_offset + 3, tmp_path / "a.otab"), "op table: truncated"),
        (flip(bundle, lay.replace_ops[1][1], tmp_path / "b.otab"), "payload hash mismatch"),
        (cut(bundle, lay.size - 1, tmp_path / "c.otab"), "truncated"),
    ]
    start = len(device.outbox())
    for path, reason in cases:
        refuse(device, path, reason)
        assert reason in device.status()["last_result"]["reason"]
    failures = [e for e in device.outbox()[start:] if e["result"] == "failed"]
    assert len(failures) == len(cases)
    for event, (_, reason) in zip(failures, cases, strict=True):
        assert event["event"] == "install"
        assert reason in event["reason"]
    assert len({e["txn"] for e in failures}) == len(cases)  # one transaction per attempt


def test_install_failing_mid_payload_over_a_pending_trial_cancels_that_trial(
    device: SimDevice, make_bundle: BundleFactory, images: Images, tmp_path: Path
) -> None:
    """The pending trial's slot was overwritten and marked bad: the trial is gone,
    and the next boot must not report a rollback of a version no slot holds."""
    device.install_ok(make_bundle("2.0"))
    bundle = make_bundle("3.0", image=images.v3)
    refuse(device, cut(bundle, layout(bundle).ops_end - 1, tmp_path / "cut.otab"), "truncated")
    doc = device.status()
    assert doc["slots"]["B"]["boot_state"] == "bad"
    assert doc["trial"] is None
    outbox_before = len(device.outbox())
    run = device.boot()
    assert run.out.splitlines()[-1] == "settled on slot A after 1 boot(s)"
    assert device.outbox()[outbox_before:] == []
    assert device.status()["last_result"]["reason"].startswith("payload of op")


def test_refuses_to_install_while_the_booted_slot_is_on_trial_and_leaves_slots_untouched(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    device.install_ok(make_bundle("2.0"))
    assert device.power_on_without_boot_check().slot == "B"  # B runs on trial, boot-check not yet run
    assert_refused_untouched(device, make_bundle("3.0", image=images.v3), "booted slot B is on trial")


def test_rejects_a_missing_bundle_file_and_records_it(device: SimDevice, tmp_path: Path) -> None:
    assert_refused_untouched(device, tmp_path / "no-such.otab", "cannot open")
