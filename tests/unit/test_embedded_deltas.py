"""Embedded deltas (bundler.format.embedded, docs/bundle-format.md section 7.3):
`ota-bundle create --delta-from OLD` appends, after the op payloads and the block
index, each delta's op table and payload, pinned by the manifest; the reader
checks where every section is (gap, overlap, outside the payload, for no image,
for a delta image, twice the same base) with the op table, and the bytes of every
section by their pinned hashes when it streams; a fetched embedded table is
checked by its hash and as a delta image of its image; `--delta-from` values are
checked before anything is written, each refusal naming the option."""

from __future__ import annotations

import io
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bundler.build import BundleSpec, OptionError, build_full
from bundler.cli import main as bundle_main
from bundler.format import embedded
from bundler.format.errors import BoundsError, FormatError, HashMismatchError
from bundler.format.header import Header
from bundler.format.manifest import EmbeddedDeltaRef, ImageEntry, Manifest, parse
from bundler.format.ops import OpType, unpack_table
from bundler.format.reader import BundleReader
from bundler.format.signing import verify
from bundler.format.writer import write_bundle_file

from .conftest import KeyPair

MiB = 1 << 20


def images(tmp_path: Path) -> tuple[Path, Path, Path]:
    """v1 (random, a zero MiB), v2 and v0: v1 with a few places rewritten."""
    rng = random.Random(7)
    v1 = bytearray(rng.randbytes(3 * MiB)) + bytes(MiB)

    def edit(base: bytearray, n: int) -> bytes:
        out = bytearray(base)
        for _ in range(n):
            at = rng.randrange(0, 3 * MiB - 9000)
            out[at : at + 8000] = rng.randbytes(8000)
        return bytes(out)

    paths = tmp_path / "v0.img", tmp_path / "v1.img", tmp_path / "v2.img"
    paths[0].write_bytes(edit(v1, 5))
    paths[1].write_bytes(bytes(v1))
    paths[2].write_bytes(edit(v1, 5))
    return paths


def build(tmp_path: Path, key: KeyPair, image: Path, out: str = "out.otab", **spec: Any) -> Path:
    path = tmp_path / out
    build_full(BundleSpec(image=image, key=key.private_path, version="1", security_version=1,
                          compatible="test-board", level=1, **spec), path, overwrite=True)
    return path


@pytest.fixture
def bundle(tmp_path: Path, signing_key: KeyPair) -> Path:
    v0, v1, v2 = images(tmp_path)
    return build(tmp_path, signing_key, v2, delta_from=(("rootfs", v1), ("rootfs", v0)))


def split(path: Path) -> tuple[Header, Manifest, bytes, bytes]:
    data = path.read_bytes()
    header = Header.unpack(data[:64])
    m = parse(data[64 : 64 + header.manifest_length])
    return header, m, data[header.op_table_offset : header.payload_offset], data[header.payload_offset :]


def read_all(data: bytes, key: KeyPair) -> None:
    """Everything a streaming reader does, front to back."""
    reader = BundleReader(io.BytesIO(data))
    ops = reader.read_op_table(verify(reader.read_head(), key.keyring))
    for _ in reader.iter_payload(ops):
        pass


def resigned(path: Path, key: KeyPair, out: Path, **manifest: Any) -> bytes:
    _, m, table, payload = split(path)
    write_bundle_file(out, replace(m, **manifest), unpack_table(table), io.BytesIO(payload), [key.key])
    return out.read_bytes()


def test_each_delta_from_appends_its_op_table_and_payload_after_the_block_index(
    bundle: Path, signing_key: KeyPair, tmp_path: Path
) -> None:
    _, m, _, payload = split(bundle)
    assert m.block_index is not None
    refs = m.embedded_deltas
    assert len(refs) == 2
    assert refs[0].table_offset == m.block_index.offset + m.block_index.length
    assert refs[1].table_offset == refs[0].payload_offset + refs[0].payload_length
    assert refs[1].payload_offset + refs[1].payload_length == m.payload_length
    for k, ref in enumerate(refs):
        raw = payload[ref.table_offset : ref.table_offset + embedded.table_length(ref)]
        ops = embedded.load_table(raw, ref, k, m.images[0])
        assert {op.type for op in ops} >= {OpType.SOURCE_COPY}, "a delta: most of the image comes from the base"
        assert ref.payload_length < len(payload) / 10
    read_all(bundle.read_bytes(), signing_key)
    assert m.images[0].base_sha256 is None, "the image itself stays a full image"


def test_a_bundle_without_delta_from_has_no_embedded_deltas_key(tmp_path: Path, signing_key: KeyPair) -> None:
    _, _, v2 = images(tmp_path)
    header, m, _, _ = split(build(tmp_path, signing_key, v2))
    assert m.embedded_deltas == ()
    data = (tmp_path / "out.otab").read_bytes()
    assert b"embedded_deltas" not in data[64 : 64 + header.manifest_length]


def _first(m: Manifest, **changes: Any) -> tuple[EmbeddedDeltaRef, ...]:
    return (replace(m.embedded_deltas[0], **changes), *m.embedded_deltas[1:])


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda m, r: {"payload_length": r.payload_length + 1}, FormatError, "overlaps the section before it"),
        (lambda m, r: {"table_offset": r.table_offset + 1}, FormatError, "leaves a gap"),
        (lambda m, r: {"table_offset": r.table_offset - 8}, FormatError, "op table at payload offset .* overlaps"),
        (lambda m, r: {"slot_class": "appfs"}, FormatError, "no image in this bundle"),
        (lambda m, r: {"table_count": 32768}, BoundsError, "embedded delta ops"),
    ],
)
def test_misplaced_embedded_sections_are_refused_with_the_op_table(
    bundle: Path, signing_key: KeyPair, tmp_path: Path, change: Any, error: type[Exception], message: str
) -> None:
    _, m, _, _ = split(bundle)
    refs = _first(m, **change(m, m.embedded_deltas[0]))
    hostile = resigned(bundle, signing_key, tmp_path / "h.otab", embedded_deltas=refs)
    reader = BundleReader(io.BytesIO(hostile))
    verified = verify(reader.read_head(), signing_key.keyring)
    with pytest.raises(error, match=message):
        reader.read_op_table(verified)


def test_the_last_section_may_not_reach_past_the_payload(bundle: Path, signing_key: KeyPair, tmp_path: Path) -> None:
    _, m, _, _ = split(bundle)
    refs = list(m.embedded_deltas)
    refs[-1] = replace(refs[-1], payload_length=refs[-1].payload_length + 4096)
    hostile = resigned(bundle, signing_key, tmp_path / "h.otab", embedded_deltas=tuple(refs))
    with pytest.raises(FormatError, match=r"past the end of the payload .*outside the bundle"):
        read_all(hostile, signing_key)


def test_two_embedded_deltas_from_one_base_and_one_for_a_delta_image_are_refused() -> None:
    full = ImageEntry("rootfs", 4096, "a" * 64, 0, 1)
    ref = EmbeddedDeltaRef("rootfs", "b" * 64, 4096, 0, 1, "c" * 64, 128, 0, "d" * 64)
    twice = (ref, replace(ref, table_offset=128, payload_offset=256))
    with pytest.raises(FormatError, match="embedded deltas 0 and 1 both apply to rootfs base"):
        embedded.check_sections([full], twice, 0, 256)
    with pytest.raises(FormatError, match="is itself a delta"):
        embedded.check_sections([replace(full, base_sha256="e" * 64, base_size=4096)], (ref,), 0, 128)


def test_damaged_embedded_bytes_are_refused_by_their_pinned_hashes_when_streamed(
    bundle: Path, signing_key: KeyPair
) -> None:
    header, m, _, _ = split(bundle)
    ref = m.embedded_deltas[0]
    for at, what in ((ref.table_offset + 3, "embedded delta 0 op table"),
                     (ref.payload_offset + ref.payload_length - 1, "embedded delta 0 payload")):
        data = bytearray(bundle.read_bytes())
        data[header.payload_offset + at] ^= 1
        with pytest.raises(HashMismatchError, match=what):
            read_all(bytes(data), signing_key)


def test_ota_bundle_verify_checks_the_embedded_sections(
    bundle: Path, signing_key: KeyPair, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert bundle_main(["verify", str(bundle), "--keyring", str(signing_key.public_path)]) == 0
    data = bytearray(bundle.read_bytes())
    data[-1] ^= 1
    damaged = tmp_path / "damaged.otab"
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    assert bundle_main(["verify", str(damaged), "--keyring", str(signing_key.public_path)]) != 0
    assert "embedded delta 1 payload hash mismatch" in capsys.readouterr().err


def test_a_fetched_embedded_table_that_is_no_delta_of_its_image_is_refused(bundle: Path) -> None:
    _, m, _, payload = split(bundle)
    ref = m.embedded_deltas[0]
    raw = payload[ref.table_offset : ref.table_offset + embedded.table_length(ref)]
    with pytest.raises(HashMismatchError, match="embedded delta 0 op table hash mismatch"):
        embedded.load_table(raw[:-1] + bytes([raw[-1] ^ 1]), ref, 0, m.images[0])
    with pytest.raises(FormatError, match=r"embedded delta 0: .*ops cover"):
        embedded.load_table(raw, ref, 0, replace(m.images[0], size=m.images[0].size + 4096))
    with pytest.raises(FormatError, match=r"its ops reference .* the manifest says"):
        embedded.load_table(raw, replace(ref, payload_length=ref.payload_length + 1), 0, m.images[0])


def test_rebased_tables_point_into_the_payload_region(bundle: Path) -> None:
    _, m, _, payload = split(bundle)
    ref = m.embedded_deltas[0]
    raw = payload[ref.table_offset : ref.table_offset + embedded.table_length(ref)]
    buf = bytearray(raw)
    ops = embedded.load_table(bytes(raw), ref, 0, m.images[0])
    embedded.rebase(buf, ops, ref.payload_offset)
    moved = unpack_table(buf)
    for before, after in zip(ops, moved, strict=True):
        if before.payload_length:
            assert after.payload_offset == before.payload_offset + ref.payload_offset
        else:
            assert after == before


def test_bad_delta_from_values_are_refused_naming_the_option(tmp_path: Path, signing_key: KeyPair) -> None:
    v0, v1, v2 = images(tmp_path)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"delta_from": (("appfs", v1),)}, "no image for it"),
        ({"delta_from": (("rootfs", tmp_path / "gone.img"),)}, "No such file"),
        ({"delta_from": (("rootfs", v1), ("rootfs", v1))}, "given twice"),
        ({"delta_from": (("rootfs", v2),)}, "is the rootfs image itself"),
        ({"delta_from": (("rootfs", v1),), "base": {"rootfs": v0}}, "is a delta"),
    ]
    for spec, message in cases:
        with pytest.raises(OptionError, match=f"--delta-from: .*{message}"):
            build(tmp_path, signing_key, v2, out="refused.otab", **spec)
        assert not (tmp_path / "refused.otab").exists()


def test_the_cli_takes_delta_from_and_inspect_lists_the_embedded_deltas(
    tmp_path: Path, signing_key: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    v0, v1, v2 = images(tmp_path)
    out = tmp_path / "cli.otab"
    argv = ["create", "--image", str(v2), "--key", str(signing_key.private_path), "--version", "2",
            "--security-version", "1", "--compatible", "test-board", "--level", "1",
            "--delta-from", str(v1), "--delta-from", f"rootfs={v0}", "-o", str(out)]
    assert bundle_main(argv) == 0
    assert "embedded delta  rootfs from base" in capsys.readouterr().out
    assert bundle_main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["embedded_deltas"]) == 2
    assert info["embedded_deltas"][0]["base_size"] == v1.stat().st_size


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.update(extra=1), "embedded_deltas\\[0\\] has unknown key 'extra'"),
        (lambda e: e["op_table"].update(count=0), "op_table.count = 0 is outside"),
        (lambda e: e["payload"].pop("sha256"), "payload.sha256 is missing"),
        (lambda e: e.update(base_sha256="XY"), "base_sha256 is not a lowercase SHA-256"),
    ],
)
def test_malformed_embedded_delta_keys_are_refused_naming_the_key(bundle: Path, change: Any, message: str) -> None:
    _, m, _, _ = split(bundle)
    doc = m.to_json()
    change(doc["embedded_deltas"][0])
    with pytest.raises(FormatError, match=message):
        parse(json.dumps(doc).encode())


def test_a_device_holds_at_most_max_embedded_ops_records_the_largest_delta_of_each_class_counts() -> None:
    full = ImageEntry("rootfs", 4096, "a" * 64, 0, 1)
    n = embedded.MAX_EMBEDDED_OPS - 100

    def ref(base: str, at: int, count: int) -> EmbeddedDeltaRef:
        return EmbeddedDeltaRef("rootfs", base * 64, 4096, at, count, "c" * 64, at + 128 * count, 0, "d" * 64)

    a = ref("b", 0, n)
    b = ref("e", 128 * n, n)
    assert embedded.check_sections([full], (a, b), 0, 256 * n) == 256 * n, "one of them is held, not both"
    big = ref("b", 0, embedded.MAX_EMBEDDED_OPS + 1)
    with pytest.raises(BoundsError, match="embedded delta ops"):
        embedded.check_sections([full], (big,), 0, 128 * big.table_count)


def test_without_a_block_index_the_first_section_starts_where_the_op_payloads_end(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    _, v1, v2 = images(tmp_path)
    path = build(tmp_path, signing_key, v2, block_index=False, delta_from=(("rootfs", v1),))
    _, m, table, _ = split(path)
    assert m.block_index is None
    ref = m.embedded_deltas[0]
    assert ref.table_offset == sum(op.payload_length for op in unpack_table(table))
    read_all(path.read_bytes(), signing_key)
