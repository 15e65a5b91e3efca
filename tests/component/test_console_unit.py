"""The console's systemd template, `ota-console@.service`, instantiated for a port
(ota-console@ttyS0.service): `systemd-analyze verify` passes without a word about
it, a misspelt key in it is caught (the negative control), the exposure score is
low, and it runs `ota-agent console` on /dev/<instance> as a notify service with a
watchdog, bound to the port's device and in conflict with a getty on it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.component._units import unit_settings

TEMPLATE = Path(__file__).resolve().parents[2] / "systemd" / "ota-console@.service"
INSTANCE = "ota-console@ttyS0.service"
AGENT = "/usr/bin/ota-agent"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")


def _staged(tmp_path: Path, edit: str = "") -> Path:
    stub = tmp_path / "bin" / "ota-agent"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = TEMPLATE.read_text()
    assert AGENT in text
    text = text.replace(AGENT, str(stub))
    if edit:
        text = text.replace("[Service]\n", f"[Service]\n{edit}\n")
    (tmp_path / TEMPLATE.name).write_text(text)
    (tmp_path / INSTANCE).write_text(text)
    return tmp_path / INSTANCE


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], check=False, capture_output=True,
                          text=True, cwd=unit.parent)


def test_the_template_instance_verifies_without_warnings(tmp_path: Path) -> None:
    result = _verify(_staged(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "ota-console" in line] == [], output


def test_verify_catches_a_broken_template(tmp_path: Path) -> None:
    result = _verify(_staged(tmp_path, edit="WatchdogSecs=10"))
    assert "Unknown key 'WatchdogSecs'" in result.stdout + result.stderr


def test_hardening_exposure_is_low(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(_staged(tmp_path))],
                            check=False, capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert m is not None, result.stdout + result.stderr
    assert float(m.group(1)) <= 3.0


def test_it_serves_the_instance_port_with_the_agent() -> None:
    settings = unit_settings(TEMPLATE)
    assert settings["Service.ExecStart"] == [f"{AGENT} -c /etc/edge-ota/agent.toml console --port /dev/%I"]
    assert settings["Service.Type"] == ["notify"]
    assert settings["Service.WatchdogSec"] == ["60s"]
    assert settings["Unit.BindsTo"] == ["dev-%i.device"]
    assert settings["Unit.Conflicts"] == ["serial-getty@%i.service"]
    assert "/dev/%I rw" in settings["Service.DeviceAllow"]
