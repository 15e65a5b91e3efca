"""The shipped systemd units pass `systemd-analyze verify` without a single
warning about them, score a low exposure in `systemd-analyze security`, and say
what the agent relies on (Type=notify + WatchdogSec, boot-complete.target
ordering, device access for slots and the watchdog)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.component._units import unit_settings

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("ota-agent.service", "ota-boot-check.service", "ota-trial-watchdog.service")
# Sandboxed with a mount namespace; the trial watchdog runs before /tmp and /var exist.
HARDENED = ("ota-agent.service", "ota-boot-check.service")
AGENT = "/usr/bin/ota-agent"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")


def _staged(tmp_path: Path, edit: str = "") -> list[Path]:
    """Copies of the units whose ExecStart points at an executable stub (verify
    checks that the binary exists), optionally with `edit` appended to [Service]."""
    stub = tmp_path / "bin" / "ota-agent"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    out = []
    for name in UNITS:
        text = (UNITS_DIR / name).read_text()
        assert AGENT in text
        text = text.replace(AGENT, str(stub))
        if edit:
            text = text.replace("[Service]\n", f"[Service]\n{edit}\n")
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


def _verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], check=False, capture_output=True, text=True
    )


def test_units_verify_without_warnings(tmp_path: Path) -> None:
    result = _verify(_staged(tmp_path))
    output = result.stdout + result.stderr
    about_ours = [line for line in output.splitlines() if any(u.split(".")[0] in line for u in UNITS)]
    assert result.returncode == 0, output
    assert about_ours == [], output


def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    # The negative control: a misspelt key is reported, so silence above means something.
    result = _verify(_staged(tmp_path, edit="WatchdogSecs=10"))
    assert "Unknown key 'WatchdogSecs'" in result.stdout + result.stderr


@pytest.mark.parametrize("name", HARDENED)
def test_hardening_exposure_is_low(tmp_path: Path, name: str) -> None:
    staged = {p.name: p for p in _staged(tmp_path)}
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(staged[name])],
        check=False, capture_output=True, text=True,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert m is not None, result.stdout + result.stderr
    assert float(m.group(1)) <= 3.0


def _settings(name: str) -> dict[str, list[str]]:
    return unit_settings(UNITS_DIR / name)


def test_agent_service_is_a_notify_service_with_a_watchdog() -> None:
    s = _settings("ota-agent.service")
    assert s["Service.ExecStart"] == ["/usr/bin/ota-agent -c /etc/edge-ota/agent.toml run"]
    assert s["Service.Type"] == ["notify"]
    assert s["Service.Restart"] == ["on-failure"]
    assert s["Service.WatchdogSec"] == ["60s"]
    assert s["Service.ProtectSystem"] == ["strict"]
    assert s["Service.StateDirectory"] == ["edge-ota"]
    assert "ota-boot-check.service" in s["Unit.After"]  # never installs while a trial is assessed
    allowed = s["Service.DeviceAllow"]
    for dev in ("/dev/watchdog rw", "char-watchdog rw", "block-mmc rw", "block-blkext rw", "block-sd rw"):
        assert dev in allowed


def test_boot_check_gates_boot_complete_target() -> None:
    s = _settings("ota-boot-check.service")
    assert s["Service.ExecStart"] == ["/usr/bin/ota-agent -c /etc/edge-ota/agent.toml boot-check"]
    assert s["Service.Type"] == ["oneshot"]
    assert s["Service.RemainAfterExit"] == ["yes"]
    assert "boot-complete.target" in s["Unit.Before"]
    assert s["Install.RequiredBy"] == ["boot-complete.target"]
    assert s["Install.WantedBy"] == ["multi-user.target"]


def test_the_trial_watchdog_starts_in_early_boot_and_boot_check_takes_it_over() -> None:
    s = _settings("ota-trial-watchdog.service")
    assert s["Service.ExecStart"] == ["/usr/bin/ota-agent -c /etc/edge-ota/agent.toml trial-watchdog"]
    assert s["Unit.DefaultDependencies"] == ["no"]  # not after sysinit, local-fs or the network
    assert "After" not in {k.split(".")[1] for k in s if k.startswith("Unit.")}  # waits for nothing
    assert s["Install.WantedBy"] == ["sysinit.target"]
    assert "PrivateTmp" not in {k.split(".")[1] for k in s}  # would wait for /tmp and /var
    check = _settings("ota-boot-check.service")
    assert check["Service.ExecStartPre"] == ["-+/bin/systemctl stop ota-trial-watchdog.service"]
