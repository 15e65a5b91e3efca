"""Embedded deltas (docs/bundle-format.md section 7.3, docs/adaptive.md): one full
bundle built with `--delta-from`, served by a real HTTP origin (Range, ETag),
installed onto simulated devices. A device whose booted slot's record names an
embedded delta's base downloads about that delta's size; a device on another
version installs the same bundle by block matching; a streamed install of it is
an ordinary full install that checks the embedded sections too. Hostile
bundles (signed with the real key) are refused with a specific line before
anything is written."""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import adaptive, sim
from bundler.cli import main as bundle_main
from bundler.format.embedded import table_length
from bundler.format.manifest import EmbeddedDeltaRef
from bundler.format.signing import load_private_key
from bundler.format.writer import write_bundle_file
from tests.e2e._download import Origin, download_table, origin
from tests.e2e._sim import COMPATIBLE, SimDevice, sha256_file
from tests.e2e.conftest import KeyPair
from tests.e2e.test_adaptive_blocks import Parts, downloaded, parts
from tests.e2e.test_two_image_bundle import add_appfs_class

MiB = 1 << 20
IMAGE = 8 * MiB


@dataclasses.dataclass(frozen=True)
class Versions:
    v0: Path  # an older version nobody embedded a delta for... except where a test says so
    v1: Path  # what most devices run: the bundle embeds a delta from it
    v2: Path  # the new version
    other: Path  # a version no embedded delta starts from


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    """Compressible images (text-like lines), each version changing a few scattered places."""
    d = tmp_path_factory.mktemp("versions")
    rng = random.Random(5)
    words = [rng.randbytes(6).hex().encode() for _ in range(800)]

    def text(n: int) -> bytes:
        return b" ".join(rng.choice(words) for _ in range(n // 13 + 1))[:n]

    v1 = bytearray(text(6 * MiB)) + bytes(2 * MiB)

    def changed(base: bytes, edits: int) -> bytes:
        out = bytearray(base)
        for _ in range(edits):
            at = rng.randrange(0, 6 * MiB - 20000)
            out[at : at + 12000] = text(12000)
        return bytes(out)

    v2 = changed(bytes(v1), 12)
    paths = Versions(d / "v0.img", d / "v1.img", d / "v2.img", d / "other.img")
    paths.v0.write_bytes(changed(bytes(v1), 12))
    paths.v1.write_bytes(bytes(v1))
    paths.v2.write_bytes(v2)
    paths.other.write_bytes(changed(bytes(v1), 30))
    return paths


def create(out: Path, key: KeyPair, image: Path, *options: str) -> Path:
    argv = ["create", "--image", str(image), "--key", str(key.private), "--version", "2.0",
            "--security-version", "2", "--compatible", COMPATIBLE, "--level", "3", *options, "-o", str(out)]
    assert bundle_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, versions: Versions, signing_key: KeyPair) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    return {
        "embedded": create(d / "embedded.otab", signing_key, versions.v2, "--chunk", "64K",
                           "--delta-from", str(versions.v1), "--delta-from", str(versions.v0)),
        # default 4 MiB chunks: a small op table in the head, which every adaptive install reads
        "embedded-4M": create(d / "embedded-4M.otab", signing_key, versions.v2, "--delta-from", str(versions.v1)),
        "delta": create(d / "delta.otab", signing_key, versions.v2, "--base", str(versions.v1)),
        "plain": create(d / "plain.otab", signing_key, versions.v2, "--chunk", "64K"),
        "plain-4M": create(d / "plain-4M.otab", signing_key, versions.v2),
    }


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Origin]:
    yield from origin(tmp_path / "www")


def device_on(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: KeyPair, image: Path,
              **download: object) -> SimDevice:
    sim.init(sim.SimSpec(tmp_path / "device", image, key.public, COMPATIBLE, slot_size=IMAGE + MiB))
    dev = SimDevice(tmp_path / "device", capsys)
    download_table(dev, adaptive=True, **download)
    return dev


def section_bytes(ref: EmbeddedDeltaRef) -> int:
    return table_length(ref) + ref.payload_length


def test_a_device_on_an_embedded_base_downloads_about_that_delta_and_installs_the_new_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path], lab: Origin,
) -> None:
    bundle = built["embedded-4M"]
    p = parts(bundle)
    ref = p.manifest.embedded_deltas[0]
    assert ref.base_sha256 == sha256_file(versions.v1)
    plain, delta = built["plain-4M"].stat().st_size, built["delta"].stat().st_size
    growth = bundle.stat().st_size - plain
    manifest_growth = p.header.manifest_length - parts(built["plain-4M"]).header.manifest_length
    assert growth == sum(section_bytes(r) for r in p.manifest.embedded_deltas) + manifest_growth
    dev = device_on(tmp_path, capsys, signing_key, versions.v1)

    run = dev.install_ok(lab.url(lab.publish(bundle)))

    got = downloaded(dev)
    # head and full op table, two 1-byte probes, the embedded op table, its payloads in one run
    assert got == p.head + 2 + section_bytes(ref), run.err
    assert got <= 1.2 * delta, f"{got} bytes downloaded for a {delta}-byte delta"
    assert got < plain / 10
    assert "embedded delta 0 for the base the booted slot holds" in run.err, run.err
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(versions.v2)
    assert dev.slot_image_sha256("A", IMAGE) == sha256_file(versions.v1), "the booted slot is untouched"
    dev.boot()
    assert dev.status()["slots"]["B"]["version"] == "2.0"


def test_a_device_on_the_second_embedded_base_uses_its_own_delta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path], lab: Origin,
) -> None:
    p = parts(built["embedded"])
    ref = p.manifest.embedded_deltas[1]
    assert ref.base_sha256 == sha256_file(versions.v0)
    dev = device_on(tmp_path, capsys, signing_key, versions.v0)

    run = dev.install_ok(lab.url(lab.publish(built["embedded"])))

    assert downloaded(dev) == p.head + 2 + section_bytes(ref), run.err
    assert "embedded delta 1 for" in run.err, run.err
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(versions.v2)


def test_a_device_on_another_version_installs_the_same_bundle_by_block_matching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path], lab: Origin,
) -> None:
    bundle = built["embedded"]
    dev = device_on(tmp_path, capsys, signing_key, versions.other)

    run = dev.install_ok(lab.url(lab.publish(bundle)))

    assert "apply to none of the images" in run.err, run.err
    assert "block index of" in run.err, run.err
    got = downloaded(dev)
    sections = sum(section_bytes(r) for r in parts(bundle).manifest.embedded_deltas)
    assert got < bundle.stat().st_size - sections, "block matching fetched neither delta nor every chunk"
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(versions.v2)


def test_a_streamed_install_of_a_bundle_with_embedded_deltas_is_a_full_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path],
) -> None:
    dev = device_on(tmp_path, capsys, signing_key, versions.v1)

    dev.install_ok(built["embedded"])  # a file: read front to back, embedded sections hash-checked at the end

    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(versions.v2)


def damaged_table(bundle: Path, out: Path) -> Path:
    p = parts(bundle)
    ref = p.manifest.embedded_deltas[0]
    raw = bytearray(bundle.read_bytes())
    raw[p.head + ref.table_offset + 20] ^= 0x01  # a record's destination offset: only the pinned hash covers it
    out.write_bytes(bytes(raw))
    return out


def test_an_embedded_op_table_that_does_not_match_its_hash_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path], lab: Origin,
) -> None:
    damaged = damaged_table(built["embedded"], tmp_path / "damaged.otab")
    dev = device_on(tmp_path, capsys, signing_key, versions.v1)
    before = dev.snapshot()

    line = dev.install(lab.url(lab.publish(damaged))).one_error_line()

    assert "embedded delta 0 op table hash mismatch" in line, line
    after = dev.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B")), "nothing written"
    assert after.bootloader == before.bootloader


def test_a_damaged_embedded_op_table_fails_a_streamed_install_and_the_slot_stays_unbootable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path],
) -> None:
    damaged = damaged_table(built["embedded"], tmp_path / "damaged.otab")
    dev = device_on(tmp_path, capsys, signing_key, versions.v1)

    line = dev.install(damaged).one_error_line()

    assert "embedded delta 0 op table" in line, line
    doc = dev.status()
    assert (doc["primary"], doc["slots"]["B"]["bootable"]) == ("A", False)


def resigned(bundle: Path, key: KeyPair, out: Path, **changes: object) -> Path:
    """`bundle` with its first embedded delta's manifest entry changed, signed again with the
    real key: hostile but correctly signed."""
    p: Parts = parts(bundle)
    refs = list(p.manifest.embedded_deltas)
    refs[0] = dataclasses.replace(refs[0], **changes)  # type: ignore[arg-type]
    m = dataclasses.replace(p.manifest, embedded_deltas=tuple(refs))
    write_bundle_file(out, m, p.ops, io.BytesIO(p.payload), [load_private_key(key.private)])
    return out


def hostile_cases(p: Parts) -> list[tuple[dict[str, object], str]]:
    ref = p.manifest.embedded_deltas[0]
    index = p.manifest.block_index
    assert index is not None
    return [
        ({"payload_length": ref.payload_length + 10 * MiB}, "past the end of the payload"),
        ({"table_offset": index.offset + 8}, "overlaps the section before it"),
        ({"table_count": ref.table_count + 1}, "overlaps the section before it"),
        ({"table_sha256": "0" * 64}, "embedded delta 0 op table hash mismatch"),
        ({"slot_class": "appfs"}, "which has no image in this bundle"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_a_signed_manifest_whose_embedded_delta_lies_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path], lab: Origin, case: int,
) -> None:
    changes, expected = hostile_cases(parts(built["embedded"]))[case]
    hostile = resigned(built["embedded"], signing_key, tmp_path / "hostile.otab", **changes)
    dev = device_on(tmp_path, capsys, signing_key, versions.v1)
    before = dev.snapshot()

    line = dev.install(lab.url(lab.publish(hostile))).one_error_line()

    assert expected in line, line
    after = dev.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B")), "nothing written"
    assert after.bootloader == before.bootloader
    assert dev.status()["last_result"]["result"] == "failed"


def test_max_download_bytes_refuses_an_embedded_delta_larger_than_allowed_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path], lab: Origin,
) -> None:
    p = parts(built["embedded"])
    cap = p.head + section_bytes(p.manifest.embedded_deltas[0]) // 2
    dev = device_on(tmp_path, capsys, signing_key, versions.v1, max_download_bytes=cap)
    before = dev.snapshot()

    line = dev.install(lab.url(lab.publish(built["embedded"]))).one_error_line()

    assert "max_download_bytes" in line, line
    after = dev.snapshot()
    assert (after.slot("A"), after.slot("B"), after.bootloader) == (before.slot("A"), before.slot("B"),
                                                                      before.bootloader)


def test_a_booted_slot_whose_record_names_the_base_but_holds_other_bytes_fails_and_stays_unbootable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path], lab: Origin,
) -> None:
    dev = device_on(tmp_path, capsys, signing_key, versions.v1)
    with dev.slot_path("A").open("r+b") as slot:  # changed behind the record's back
        slot.write(versions.other.read_bytes())

    line = dev.install(lab.url(lab.publish(built["embedded"]))).one_error_line()

    assert "does not hold what this delta reads there" in line, line
    doc = dev.status()
    assert (doc["primary"], doc["slots"]["B"]["bootable"]) == ("A", False)


def test_a_server_that_ignores_range_gets_the_full_bundle_streamed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions,
    built: dict[str, Path],
) -> None:
    bundle = built["embedded-4M"]
    dev = device_on(tmp_path, capsys, signing_key, versions.v1)
    for lab in origin(tmp_path / "www", ignore_range=True):
        run = dev.install_ok(lab.url(lab.publish(bundle)))
    assert "ignores Range" in run.err, run.err
    assert downloaded(dev) >= bundle.stat().st_size, "the whole bundle, embedded sections checked at its end"
    assert dev.slot_image_sha256("B", IMAGE) == sha256_file(versions.v2)


def test_a_two_image_bundle_runs_one_embedded_delta_per_image_when_the_records_name_both_bases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, versions: Versions, lab: Origin,
) -> None:
    app1 = tmp_path / "app1.img"
    app1.write_bytes(versions.v0.read_bytes()[: 3 * MiB] + bytes(17))
    app2 = tmp_path / "app2.img"
    app2.write_bytes(versions.other.read_bytes()[: 3 * MiB] + bytes(17))
    dev = device_on(tmp_path, capsys, signing_key, versions.v0)
    add_appfs_class(dev, app1)

    def two(out: str, version: str, rootfs: Path, appfs: Path, *options: str) -> Path:
        argv = ["create", "--image", f"rootfs={rootfs}", "--image", f"appfs={appfs}", "--key",
                str(signing_key.private), "--version", version, "--security-version", "2", "--compatible",
                COMPATIBLE, "--level", "3", *options, "-o", str(tmp_path / out)]
        assert bundle_main(argv) == 0
        return tmp_path / out

    dev.install_ok(two("v1.otab", "1.0", versions.v1, app1))  # the slot records now name both images
    dev.boot()
    bundle = two("v2.otab", "2.0", versions.v2, app2, "--delta-from", f"appfs={app1}",
                 "--delta-from", f"rootfs={versions.v0}", "--delta-from", f"rootfs={versions.v1}")
    p = parts(bundle)
    assert [r.slot_class for r in p.manifest.embedded_deltas] == ["appfs", "rootfs", "rootfs"]

    run = dev.install_ok(lab.url(lab.publish(bundle)))

    assert "embedded deltas 2, 0 for the base" in run.err, run.err  # rootfs from v1, appfs from app1
    chosen = p.manifest.embedded_deltas[2], p.manifest.embedded_deltas[0]
    least = p.head + 2 + sum(section_bytes(r) for r in chosen)
    # the other rootfs delta lies between the two: a gap of up to COALESCE_GAP is read through
    assert least <= downloaded(dev) <= least + adaptive.COALESCE_GAP
    assert dev.slot_image_sha256("A", IMAGE) == sha256_file(versions.v2)
    assert sha256_file(dev.dir / "appfs-A.img", app2.stat().st_size) == sha256_file(app2)
    dev.boot()
    assert dev.status()["slots"]["A"]["version"] == "2.0"
