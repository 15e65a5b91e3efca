"""Writes a man page (roff, man(7) macros) for a command from its argparse
parser, at package build time: `python manpage.py MODULE PROG [SECTION]` prints
the page of MODULE.build_parser() (agent.cli for ota-agent, bundler.cli for
ota-bundle). The page has NAME, SYNOPSIS, DESCRIPTION, OPTIONS and one
subsection per subcommand (nested ones too) with its own options, and the
date of SOURCE_DATE_EPOCH, so one commit always gives the same page.

Standard library only; reads argparse's parser objects, whose attributes for
actions and subparsers are not public API but have been stable since 3.2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

SEE_ALSO = {
    "ota-agent": "ota-bundle(1), systemctl(1), systemd.special(7)",
    "ota-bundle": "ota-agent(1)",
}


def roff(text: str) -> str:
    """Text safe for a roff line: backslashes, hyphens, leading dots and quotes escaped."""
    text = " ".join(text.split())
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    if action.help is None or action.help == argparse.SUPPRESS:
        return ""
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if "%" in action.help else action.help


def _option_label(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{roff(action.metavar or action.dest)}\\fR"  # type: ignore[arg-type]
    names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    return f"{names} \\fI{roff(str(metavar))}\\fR"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        out += [".TP", _option_label(action)]
        text = _help(action, parser)
        if text:
            out.append(roff(text))
    return out


def _subcommands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            full = f"{prefix} {name}".strip()
            out += [".SS " + roff(full)]
            out += [".nf", roff(sub.format_usage().strip().removeprefix("usage: ")), ".fi"]
            if helps.get(name):
                out += [".PP", roff(helps[name])]
            if sub.description:
                out += [".PP", roff(sub.description)]
            out += _options(sub)
            out += _subcommands(sub, full)
    return out


def render(parser: argparse.ArgumentParser, prog: str, section: str, date: str, version: str) -> str:
    lines = [
        f'.TH {prog.upper()} {section} "{date}" "edge-ota {version}" "edge-ota"',
        ".SH NAME",
        f"{roff(prog)} \\- {roff(parser.description or prog)}",
        ".SH SYNOPSIS",
        ".nf",
        roff(parser.format_usage().strip().removeprefix("usage: ")),
        ".fi",
        ".SH DESCRIPTION",
        roff(parser.description or ""),
        ".PP",
        "Each command below has its own options; "
        f"\\fB{roff(prog)} \\fICOMMAND\\fB \\-\\-help\\fR prints them too. The documentation "
        "is in \\fI/usr/share/doc/edge\\-ota/\\fR.",
        ".SH OPTIONS",
        *_options(parser),
    ]
    commands = _subcommands(parser, "")
    if commands:
        lines += [".SH COMMANDS", *commands]
    if prog in SEE_ALSO:
        lines += [".SH SEE ALSO", roff(SEE_ALSO[prog])]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: manpage.py MODULE PROG [SECTION]", file=sys.stderr)
        return 2
    module, prog = argv[0], argv[1]
    section = argv[2] if len(argv) == 3 else "1"
    parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    parser.prog = prog
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    date = datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d")
    try:
        release = version("edge-ota")
    except PackageNotFoundError:  # run from a checkout that is not installed
        release = "unknown"
    sys.stdout.write(render(parser, prog, section, date, release))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
