"""The layering rules, held by walking every import statement (ast, no imports
executed):

- ota_common/ (the leaf: error root, text, file primitives, terminal output)
  imports only the standard library and itself;
- bundler/format/ imports only the standard library, zstandard, cryptography,
  ota_common and bundler.format itself (it is the one definition both sides share);
- agent/ imports nothing from bundler/ except bundler.format;
- bundler/ imports from agent/ only the MQTT wire schema (agent.mqtt.topics,
  agent.mqtt.schema, agent.mqtt.errors: pure modules, the one definition the
  operator's ota-fleet and the device share, as bundler/format/ is for bundles);
- hw/ imports nothing from agent/ or bundler/ (so hw and bundler form no cycle).

Relative imports are resolved against the importing module's package, and
`importlib.import_module("literal")` calls count as imports.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in `source`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from bundler import build` depends on bundler.build, `from x.y import Z` on x.y(.Z)
            for alias in node.names:
                yield node.lineno, prefix if alias.name == "*" else f"{prefix}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package: str, allowed: Callable[[str], bool]) -> list[str]:
    found = []
    for path in python_files(package):
        name = module_name(path)
        for line, imported in imports_of(path.read_text(), name, path.name == "__init__.py"):
            if not allowed(imported):
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}")
    return found


def top(name: str) -> str:
    return name.split(".", 1)[0]


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def common_may_import(name: str) -> bool:
    return within(name, "ota_common") or top(name) in sys.stdlib_module_names


def format_may_import(name: str) -> bool:
    if within(name, "bundler.format") or within(name, "ota_common"):
        return True
    if within(name, "bundler"):
        return False
    return top(name) in sys.stdlib_module_names or top(name) in {"zstandard", "cryptography"}


def agent_may_import(name: str) -> bool:
    return not within(name, "bundler") or within(name, "bundler.format")


WIRE_SCHEMA = ("agent.mqtt.topics", "agent.mqtt.schema", "agent.mqtt.errors")


def bundler_may_import(name: str) -> bool:
    return not within(name, "agent") or name == "agent.mqtt" or any(within(name, m) for m in WIRE_SCHEMA)


def hw_may_import(name: str) -> bool:
    return not within(name, "agent") and not within(name, "bundler")


def test_bundle_format_imports_only_stdlib_zstandard_cryptography_and_itself() -> None:
    assert python_files("bundler/format"), "the walker sees the package"
    assert violations("bundler/format", format_may_import) == []


def test_agent_imports_nothing_from_bundler_but_the_format() -> None:
    assert violations("agent", agent_may_import) == []


def test_bundler_imports_only_the_wire_schema_from_agent() -> None:
    assert violations("bundler", bundler_may_import) == []


def test_the_wire_schema_modules_import_only_each_other_the_format_and_the_stdlib() -> None:
    """What the operator's side pulls in with the schema stays pure (no IO layers, no paho)."""
    for module in WIRE_SCHEMA:
        path = ROOT / Path(*module.split(".")).with_suffix(".py")
        for _, imported in imports_of(path.read_text(), module, False):
            pure = top(imported) in sys.stdlib_module_names or within(imported, "bundler.format") or within(
                imported, "ota_common"
            )
            assert pure or any(within(imported, m) for m in WIRE_SCHEMA), f"{module} imports {imported}"


def test_hw_imports_nothing_from_agent_or_bundler() -> None:
    assert python_files("hw"), "the walker sees the package"
    assert violations("hw", hw_may_import) == []


def test_the_common_leaf_imports_only_the_standard_library_and_itself() -> None:
    assert python_files("ota_common"), "the walker sees the package"
    assert violations("ota_common", common_may_import) == []


def test_walker_sees_real_imports() -> None:
    ops = ROOT / "bundler" / "format" / "ops.py"
    found = {name for _, name in imports_of(ops.read_text(), "bundler.format.ops", False)}
    assert {
        "zstandard",
        "hashlib",
        "bundler.format.errors.FormatError",
        "bundler.format.header.OP_RECORD_SIZE",
    } <= found


@pytest.mark.parametrize(
    ("source", "module", "rule", "bad"),
    [
        ("import paho.mqtt.client", "bundler.format.x", format_may_import, "paho.mqtt.client"),
        ("from bundler import build", "bundler.format.x", format_may_import, "bundler.build"),
        ("from .. import cli", "bundler.format.x", format_may_import, "bundler.cli"),
        ("from hw.slot import SlotWriter", "bundler.format.x", format_may_import, "hw.slot"),
        ("from bundler.format.errors import FormatError", "hw.x", hw_may_import, "bundler.format.errors"),
        ("import zstandard", "ota_common.x", common_may_import, "zstandard"),
        ("from agent.events import Event", "ota_common.x", common_may_import, "agent.events"),
        ("from bundler.build import build_full", "agent.x", agent_may_import, "bundler.build"),
        ("from bundler import cli", "agent.x", agent_may_import, "bundler.cli"),
        ("import importlib\nimportlib.import_module('bundler.build')", "agent.x", agent_may_import, "bundler.build"),
        ("from agent.errors import X", "hw.x", hw_may_import, "agent.errors"),
        ("from ...agent import daemon", "hw.bootloader.x", hw_may_import, "agent.daemon"),
        ("from agent.mqtt.link import Link", "bundler.fleet.x", bundler_may_import, "agent.mqtt.link"),
        ("from agent.actions import App", "bundler.fleet.x", bundler_may_import, "agent.actions"),
    ],
)
def test_walker_catches_violations(source: str, module: str, rule: Callable[[str], bool], bad: str) -> None:
    imported = [name for _, name in imports_of(source, module, False)]
    offending = [name for name in imported if not rule(name)]
    assert offending
    assert all(within(name, bad) for name in offending)


@pytest.mark.parametrize(
    ("source", "module", "rule"),
    [
        ("from bundler.format.reader import BundleReader", "agent.x", agent_may_import),
        ("from bundler.format import errors", "agent.x", agent_may_import),
        ("from bundler import format", "agent.x", agent_may_import),
        ("from . import header", "bundler.format.x", format_may_import),
        ("from cryptography.hazmat.primitives import hashes", "bundler.format.x", format_may_import),
        ("from __future__ import annotations", "bundler.format.x", format_may_import),
        ("from agent.mqtt.schema import parse_report", "bundler.fleet.x", bundler_may_import),
    ],
)
def test_walker_allows_the_permitted_imports(source: str, module: str, rule: Callable[[str], bool]) -> None:
    assert all(rule(name) for _, name in imports_of(source, module, False))
