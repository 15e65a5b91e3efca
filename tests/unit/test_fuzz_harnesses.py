"""The fuzz harnesses (tests/fuzz/) work without atheris and their generated
seeds reach deep: every seed of a reader that should accept it passes without
any error, the re-signing harness carries a mutated manifest past the
signature, and no seed is a finding. `make fuzz` runs them under atheris."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from bundler.format.errors import SignatureError
from tests.fuzz import fuzz_bundle, fuzz_resigned
from tests.fuzz._harness import guarded
from tests.fuzz.seeds import HARNESSES, seeds

SEEDS = seeds()
ACCEPTED = {"bundle", "resigned", "manifest", "config", "state", "outbox"}  # valid seeds: no error at all


@pytest.mark.parametrize("name", HARNESSES)
def test_every_seed_runs_through_its_harness_without_a_finding(name: str) -> None:
    module = importlib.import_module(f"tests.fuzz.fuzz_{name}")
    assert SEEDS[name], "each harness has seeds"
    for data in SEEDS[name]:
        guarded(module.one_input)(data)
        if name in ACCEPTED:
            module.one_input(data)


def test_resigning_carries_a_mutated_manifest_past_the_signature() -> None:
    data = bytearray(SEEDS["bundle"][1])
    at = data.index(b'"bundle_version":"1.1.0"') + len('"bundle_version":"1.')
    data[at] = ord("7")
    with pytest.raises(SignatureError):
        fuzz_bundle.one_input(bytes(data))
    fuzz_resigned.one_input(bytes(data))


def test_harnesses_do_not_import_atheris_at_module_level() -> None:
    for path in sorted(Path(fuzz_bundle.__file__).parent.glob("fuzz_*.py")):
        head = path.read_text().split('if __name__ == "__main__":')[0]
        assert "import atheris" not in head, path.name
