"""`make install DESTDIR=... PREFIX=...` stages what an image builder needs:
the Python package under PREFIX, ota-agent/ota-bundle in BINDIR, units whose
ExecStart names that BINDIR, the boot scripts and the example config; the
staged agent runs from the staging tree; the Python that ran it keeps its
own edge-ota installation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.vm.paths import CHECKOUT, TOP, exclusive


def test_make_install_stages_a_working_agent_under_another_prefix(tmp_path: Path) -> None:
    dest = tmp_path / "image"
    host_script = Path(sys.executable).parent / "ota-agent"
    host_had_it = host_script.exists()
    with exclusive(CHECKOUT):  # pip builds a wheel in the checkout, as the .deb build does
        done = subprocess.run(
            [
                "make",
                "-s",
                "-C",
                str(TOP),
                "install",
                f"DESTDIR={dest}",
                "PREFIX=/opt/ota",
                f"INSTALL_PYTHON={sys.executable}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    # Staging for an image leaves the build host's own installation alone.
    assert host_script.exists() == host_had_it
    agent = dest / "opt/ota/bin/ota-agent"
    assert agent.is_file()
    assert os.access(agent, os.X_OK)
    unit = (dest / "opt/ota/lib/systemd/system/ota-boot-check.service").read_text()
    assert "ExecStart=/opt/ota/bin/ota-agent -c /etc/edge-ota/agent.toml boot-check" in unit
    assert (dest / "opt/ota/share/edge-ota/grub.cfg").is_file()
    assert (dest / "etc/edge-ota/agent.toml").is_file()
    assert oct((dest / "etc/edge-ota/keys").stat().st_mode & 0o777) == "0o700"
    site = next(dest.glob("opt/ota/lib/python3*/site-packages"))
    ran = subprocess.run(
        [sys.executable, str(agent), "--version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(site)),
        check=False,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    assert "0.1.0" in ran.stdout + ran.stderr
    assert (
        str(site)
        in subprocess.run(
            [sys.executable, "-c", "import agent; print(agent.__file__)"],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(site)),
            check=True,
            cwd=tmp_path,
        ).stdout
    )
