"""Fixtures for the power-cut harness: a trusted key, small deterministic images
(the second one holds a 4 MiB zero run, so installing it punches a hole in the
slot file; "2.1" is the factory image edited and moved, as a delta against it),
their bundles built once per session, and the session summary of
ops traced and states explored, printed at the end of every run."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from bundler.build import BundleSpec, build_full
from bundler.format.signing import generate_key
from tests.powercut.explore import RESULTS, Image, summary_lines
from tests.reliability.results import record

MiB = 1 << 20
COMPATIBLE = "powercut-board"
SLOT_SIZE = 6 * MiB


@dataclass(frozen=True)
class Release:
    image: Image
    path: Path  # the image file
    bundle: Path


@dataclass(frozen=True)
class Releases:
    keyring: Path
    factory: Release
    v2: Release
    v3: Release
    v4: Release  # the "next install" after a power cut
    delta: Release  # 2.1: a delta bundle against the factory image (SOURCE_COPY and DELTA ops)

    @property
    def images(self) -> dict[str, Image]:
        return {r.image.version: r.image for r in (self.factory, self.v2, self.v3, self.delta)}


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    d = tmp_path_factory.mktemp("powercut-releases")
    private, public = generate_key(d)

    def release(version: str, security_version: int, data: bytes, base: Path | None = None) -> Release:
        path = d / f"{version}.img"
        path.write_bytes(data)
        image = Image(version, security_version, len(data), hashlib.sha256(data).hexdigest())
        bundle = d / f"{version}.otab"
        if version != "factory":
            spec = BundleSpec(image=path, key=private, version=version, security_version=security_version,
                              compatible=COMPATIBLE, threads=2, base=None if base is None else {"rootfs": base})
            build_full(spec, bundle)
        return Release(image, path, bundle)

    rng = random.Random(20240611)
    factory = release("factory", 0, rng.randbytes(MiB + 777))
    old = factory.path.read_bytes()
    # Blocks copied where they were and moved, one region edited in place, new bytes.
    edited = bytearray(old[300_000:364_000])
    edited[1000:1016] = b"edited in place!"
    derived = old[:256 * 1024] + bytes(edited) + old[800_000:] + old[64 * 1024:200_000] + rng.randbytes(5000)
    return Releases(
        keyring=public,
        factory=factory,
        v2=release("2.0", 2, rng.randbytes(MiB) + bytes(4 * MiB) + rng.randbytes(MiB // 2 + 1234)),
        v3=release("3.0", 3, rng.randbytes(MiB + MiB // 2 + 4095)),
        v4=release("4.0", 4, rng.randbytes(MiB + 333)),
        delta=release("2.1", 2, derived, base=factory.path),
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for r in RESULTS:  # for `make reliability` (tests.reliability.results; nothing without its variable)
        record("dropped-write states", f"{r.scenario}@{r.backend}", passed=not r.failures,
               unrecovered=len(r.failures), states=r.distinct, explored=r.explored)
    lines = summary_lines()
    if lines:
        terminalreporter.section("power cuts with unsynced writes dropped")
        for line in lines:
            terminalreporter.write_line(line)
