"""The soak's tallies outlive it: `make soak` writes them per part (random kills,
random dropped-write states) with the seed and time of the run that made them,
a run of one part replaces only that part, and `make reliability` reads them."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.table import load_soak, save_soak


def case(category: str, name: str, **counts: int) -> dict[str, object]:
    return {"category": category, "name": name, "passed": True, "unrecovered": 0, "seed": 7, **counts}


def test_a_soak_of_one_part_replaces_only_that_parts_tallies(tmp_path: Path) -> None:
    results = tmp_path / "last-soak.json"
    assert load_soak(results) == {}
    full = [case("random kills", b, kills=125) for b in ("sim", "uboot")]
    full += [case("random dropped-write states", b, states=123) for b in ("sim", "uboot")]
    full.append(case("crash point", "install:mid-payload@sim"))  # not a soak row: not kept
    save_soak(results, full, 7, False)
    save_soak(results, [case("random dropped-write states", b, states=126) for b in ("sim", "uboot")], 8, False)
    last = load_soak(results)
    assert set(last) == {"random kills", "random dropped-write states"}
    kills_when, kills = last["random kills"]
    states_when, states = last["random dropped-write states"]
    assert kills_when.startswith("seed 7, finished ")
    assert states_when.startswith("seed 8, finished ")
    assert (kills.cases, kills.passed, kills.unrecovered, kills.counts["kills"]) == (2, 2, 0, 250)
    assert states.counts["states"] == 252
    assert "seed" not in states.counts


def test_a_damaged_results_file_shows_no_soak_rows(tmp_path: Path) -> None:
    results = tmp_path / "last-soak.json"
    results.write_text('{"categories": {"random kills": {"cases": [{"category": 1}]}}}')
    assert load_soak(results) == {}
