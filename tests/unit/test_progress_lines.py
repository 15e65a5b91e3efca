"""Progress on a non-terminal prints one line per quarter, every quarter once."""

from __future__ import annotations

import io

from ota_common.tty import Progress


def lines(updates: list[tuple[int, int]]) -> list[str]:
    out = io.StringIO()
    progress = Progress("writing", out)
    for done, total in updates:
        progress(done, total)
    return out.getvalue().splitlines()


def test_an_update_that_jumps_several_quarters_prints_each_of_them() -> None:
    assert lines([(80, 100), (100, 100)]) == ["writing: 25%", "writing: 50%", "writing: 75%", "writing: 100%"]


def test_the_same_progress_in_other_steps_prints_the_same_lines() -> None:
    fine = lines([(n, 100) for n in range(0, 101, 5)])
    coarse = lines([(0, 100), (60, 100), (100, 100)])
    assert fine == coarse == ["writing: 25%", "writing: 50%", "writing: 75%", "writing: 100%"]


def test_no_line_before_the_first_quarter_and_none_twice() -> None:
    assert lines([(10, 100), (20, 100), (30, 100), (30, 100), (49, 100)]) == ["writing: 25%"]
