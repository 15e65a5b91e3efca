"""packaging/manpage.py, which makes the .deb's man pages from the commands'
argparse parsers: every subcommand (nested ones too) and option is in the page,
roff's special characters are escaped, the date is SOURCE_DATE_EPOCH's (one
commit, one page), and man(1) renders it without a warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import build_parser

TOP = Path(__file__).resolve().parents[2]
SCRIPT = TOP / "packaging" / "manpage.py"


def _page(module: str, prog: str, epoch: str = "1700000000") -> str:
    env = dict(os.environ, SOURCE_DATE_EPOCH=epoch)
    done = subprocess.run([sys.executable, str(SCRIPT), module, prog], capture_output=True, text=True, env=env,
                          cwd=TOP, check=True)
    return done.stdout


def test_the_agent_page_names_every_command_and_its_options() -> None:
    page = _page("agent.cli", "ota-agent")
    assert page.startswith('.TH OTA-AGENT 1 "2023-11-14" "edge-ota ')
    assert "\n.SH NAME\nota\\-agent \\- edge\\-ota device agent\n" in page
    subs = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in subs.choices:  # type: ignore[union-attr]
        assert f"\n.SS {name.replace('-', chr(92) + '-')}\n" in page, name
    assert "\n.SS sim init\n" in page  # nested subcommands
    assert "\n.SS bootloader init\n" in page
    assert "\\fB\\-\\-config\\fR \\fICONFIG\\fR" in page
    assert "\n.SS trial\\-watchdog\n" in page


def test_the_page_of_one_commit_is_the_same_every_time() -> None:
    assert _page("bundler.cli", "ota-bundle") == _page("bundler.cli", "ota-bundle")
    assert '"2023-11-14"' not in _page("bundler.cli", "ota-bundle", epoch="0")


def test_no_line_starts_a_roff_request_by_accident() -> None:
    page = _page("bundler.cli", "ota-bundle")
    requests = {line.split()[0] for line in page.splitlines() if line.startswith((".", "'"))}
    assert requests <= {".TH", ".SH", ".SS", ".TP", ".PP", ".nf", ".fi"}


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db absent")
@pytest.mark.parametrize(("module", "prog"), [("agent.cli", "ota-agent"), ("bundler.cli", "ota-bundle")])
def test_man_renders_the_page_without_warnings(tmp_path: Path, module: str, prog: str) -> None:
    page = tmp_path / f"{prog}.1"
    page.write_text(_page(module, prog))
    env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80")
    done = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", str(page)], capture_output=True, text=True,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "COMMANDS" in done.stdout
    assert f"{prog} install" in done.stdout or f"{prog} create" in done.stdout
