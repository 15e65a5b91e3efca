"""The USB stick units: `ota-media@.service` (started by the udev rule), the
polling fallback (`ota-media-poll.timer` + `.service`) and the daemon's drop-in
that lets it mount sticks pass `systemd-analyze verify` without a warning about
them and keep a low exposure; the udev rule is well formed (no udevadm here: a
parser of the rule syntax) and starts the template unit with the kernel name,
for exactly the filesystems the agent mounts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.media.mount import TYPES
from tests.component._units import unit_settings

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
AGENT = "/usr/bin/ota-agent"
RULE = UNITS_DIR / "90-edge-ota-media.rules"
MEDIA_UNITS = ("ota-media@.service", "ota-media-poll.service", "ota-media-poll.timer")

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")


def _stage(tmp_path: Path, names: tuple[str, ...], edit: str = "") -> Path:
    stub = tmp_path / "bin" / "ota-agent"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in names:
        source = UNITS_DIR / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
            continue
        text = source.read_text().replace(AGENT, str(stub))
        if edit:
            text = text.replace("[Service]\n", f"[Service]\n{edit}\n")
        (tmp_path / name).write_text(text)
    template = tmp_path / "ota-media@.service"
    if template.exists():
        shutil.copyfile(template, tmp_path / "ota-media@sdb1.service")
    return tmp_path


def _analyze(tmp_path: Path, *argv: str) -> str:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    result = subprocess.run(["systemd-analyze", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=False)
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


@needs_systemd
def test_media_units_verify_without_warnings(tmp_path: Path) -> None:
    d = _stage(tmp_path, MEDIA_UNITS)
    out = _analyze(d, "verify", "--man=no", "ota-media@sdb1.service", "ota-media-poll.service",
                   "ota-media-poll.timer")
    assert out.startswith("rc=0\n"), out
    assert [line for line in out.splitlines()[1:] if "ota-media" in line] == [], out


@needs_systemd
def test_verify_does_catch_a_broken_media_unit(tmp_path: Path) -> None:
    d = _stage(tmp_path, MEDIA_UNITS, edit="TimeoutStartSecs=1")
    assert "Unknown key 'TimeoutStartSecs'" in _analyze(d, "verify", "--man=no", "ota-media@sdb1.service")


@needs_systemd
@pytest.mark.parametrize("name", ["ota-media@sdb1.service", "ota-media-poll.service"])
def test_media_services_keep_a_low_exposure(tmp_path: Path, name: str) -> None:
    out = _analyze(_stage(tmp_path, MEDIA_UNITS), "security", "--offline=true", "--no-pager", name)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert m is not None, out
    assert float(m.group(1)) <= 3.0


@needs_systemd
def test_the_daemons_drop_in_adds_mounting_and_nothing_else_breaks(tmp_path: Path) -> None:
    d = _stage(tmp_path, ("ota-agent.service", "ota-agent.service.d"))
    verify = _analyze(d, "verify", "--man=no", "ota-agent.service")
    assert verify.startswith("rc=0\n"), verify
    security = _analyze(d, "security", "--offline=true", "--no-pager", "ota-agent.service")
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_SYS_ADMIN", security), security  # the drop-in is applied
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security)
    assert m is not None
    assert float(m.group(1)) <= 3.5


def _settings(name: str) -> dict[str, list[str]]:
    return unit_settings(UNITS_DIR / name)


def test_the_template_runs_the_media_command_on_its_device() -> None:
    s = _settings("ota-media@.service")
    assert s["Service.ExecStart"] == [f"{AGENT} -c /etc/edge-ota/agent.toml media /dev/%I"]
    assert s["Service.Type"] == ["oneshot"]
    assert "ota-boot-check.service" in " ".join(s["Unit.After"])
    assert "@mount" in s["Service.SystemCallFilter"][0]
    poll = _settings("ota-media-poll.service")
    assert poll["Service.ExecStart"] == [f"{AGENT} -c /etc/edge-ota/agent.toml media-poll"]
    timer = _settings("ota-media-poll.timer")
    assert timer["Install.WantedBy"] == ["timers.target"]
    assert "Timer.OnUnitInactiveSec" in timer


_ITEM = re.compile(r'\s*([A-Z_]+)(?:\{([^}]+)\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(?:,|$)')
_KEYS = {"ACTION", "SUBSYSTEM", "ENV", "ATTRS", "GOTO", "LABEL", "TAG", "KERNEL"}


def _rule_lines() -> list[list[tuple[str, str | None, str, str]]]:
    rules = []
    for raw in RULE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        items, at = [], 0
        while at < len(line):
            m = _ITEM.match(line, at)
            assert m is not None, f"not udev rule syntax at {line[at:]!r}"
            key, arg, op, value = m.groups()
            assert key in _KEYS, key
            items.append((key, arg, op, value))
            at = m.end()
        rules.append(items)
    return rules


def test_udev_rule_is_well_formed_and_starts_the_template_for_the_agents_filesystems() -> None:
    rules = _rule_lines()
    labels = {v for r in rules for k, _, _, v in r if k == "LABEL"}
    gotos = {v for r in rules for k, _, _, v in r if k == "GOTO"}
    assert gotos <= labels
    flat = [item for r in rules for item in r]
    assert ("ACTION", None, "!=", "add") in flat
    assert ("SUBSYSTEM", None, "!=", "block") in flat
    [fs] = [v for k, a, op, v in flat if (k, a, op) == ("ENV", "ID_FS_TYPE", "!=")]
    assert set(fs.split("|")) == set(TYPES)
    assert ("ENV", "SYSTEMD_WANTS", "+=", "ota-media@%k.service") in flat
    assert ("TAG", None, "+=", "systemd") in flat
    assert (UNITS_DIR / "ota-media@.service").exists()
