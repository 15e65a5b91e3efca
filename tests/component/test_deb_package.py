"""`make deb`'s package installs with a real `dpkg -i` into a debootstrap'd
Debian bookworm root (chroot) and works there with the target's own
/usr/bin/python3: `ota-agent --version`, `ota-bundle --version`, the units
enabled, the example config a conffile; `dpkg -r` leaves nothing of the
virtualenv behind, and two builds of one commit are byte-identical."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import paths

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="dpkg -i in a chroot needs root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap absent"),
    pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no Debian /usr/bin/python3 to build the venv"),
]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return paths.build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture
def chroot(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(paths.base_tarball())], check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _in(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, env=env, check=False)


def test_the_package_installs_in_a_bookworm_chroot_and_the_agent_runs(deb: Path, chroot: Path) -> None:
    shutil.copy(deb, chroot / "tmp" / deb.name)
    done = _in(chroot, "dpkg", "-i", f"/tmp/{deb.name}")
    assert done.returncode == 0, done.stdout + done.stderr

    version = _in(chroot, "ota-agent", "--version")
    assert version.returncode == 0, version.stderr
    assert "0.1.0" in version.stdout + version.stderr
    bundle = _in(chroot, "ota-bundle", "--version")
    assert bundle.returncode == 0, bundle.stderr
    # The venv runs on the chroot's Debian python3, not the build host's.
    cfg = (chroot / "opt/edge-ota/pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg
    assert "/build" not in cfg
    assert "/tmp" not in cfg
    imports = _in(chroot, "/opt/edge-ota/bin/python", "-c", "import paho.mqtt, zstandard, cryptography, agent.cli")
    assert imports.returncode == 0, imports.stderr

    assert (chroot / "lib/systemd/system/ota-boot-check.service").is_file()
    assert (chroot / "etc/systemd/system/multi-user.target.wants/ota-agent.service").is_symlink()
    assert (chroot / "etc/systemd/system/boot-complete.target.requires/ota-boot-check.service").is_symlink()
    assert (chroot / "usr/share/edge-ota/grub.cfg").is_file()
    status = _in(chroot, "dpkg-query", "-W", "-f=${Conffiles}", "edge-ota")
    assert "/etc/edge-ota/agent.toml" in status.stdout

    removed = _in(chroot, "dpkg", "-r", "edge-ota")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not (chroot / "opt/edge-ota").exists(), list((chroot / "opt/edge-ota").rglob("*"))[:5]
    assert (chroot / "etc/edge-ota/agent.toml").exists()  # a conffile stays until purge
    purged = _in(chroot, "dpkg", "--purge", "edge-ota")
    assert purged.returncode == 0, purged.stderr
    assert not (chroot / "etc/edge-ota/agent.toml").exists()


def test_two_builds_of_one_tree_are_identical(deb: Path, tmp_path: Path) -> None:
    again = paths.build_deb(tmp_path)
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(deb.read_bytes()).hexdigest()
