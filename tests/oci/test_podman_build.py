"""A real `podman build` (Debian's podman, vfs storage, chroot isolation, as
root) from a Containerfile whose base image the test imports from a tiny rootfs
tarball it builds (dash, rm, ln, chmod and the C library; no registry is
reachable). The image, saved as a docker archive, becomes an ext4 and an erofs
image holding the same files as `podman export` of a container of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.oci.image import build_image
from tests.oci._trees import mounted, summary

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="podman build with vfs storage needs root"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed (Debian package podman)"),
]

BINARIES = ["/bin/dash", "/bin/rm", "/bin/ln", "/bin/chmod"]
LIBS = ["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
CONTAINERFILE = """FROM localhost/edge-base:1
COPY motd /etc/motd
RUN rm /etc/removed && ln /etc/a /etc/b && chmod 4755 /etc/a
"""


def _base_rootfs(root: Path) -> Path:
    for d in ("bin", "etc", "tmp", "lib/x86_64-linux-gnu", "lib64"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for b in BINARIES:
        shutil.copy2(b, root / "bin" / ("sh" if b.endswith("dash") else Path(b).name))
    for lib in LIBS:
        if not os.path.exists(lib):
            pytest.skip(f"{lib} not found: the tiny base rootfs is made for x86_64 Debian")
        shutil.copy2(lib, root / lib.lstrip("/"))
    (root / "etc/hostname").write_text("base\n")
    (root / "etc/removed").write_text("a whiteout removes this\n")
    (root / "etc/a").write_text("a\n")
    return root


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv[-3:]}: {done.stderr[-2000:]}"


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[list[str]]:
    """podman with its own storage; the run root is short (podman refuses one past 50 characters)."""
    runroot = tempfile.mkdtemp(prefix="ota-pm-", dir="/tmp")
    try:
        yield [
            "podman",
            "--root",
            str(tmp_path / "storage"),
            "--runroot",
            runroot,
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def test_a_podman_built_image_becomes_ext4_and_erofs_with_the_files_of_podman_export(
    tmp_path: Path, podman: list[str]
) -> None:
    rootfs = _base_rootfs(tmp_path / "rootfs")
    tarball = tmp_path / "base.tar"
    _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."])
    _run([*podman, "import", str(tarball), "localhost/edge-base:1"])
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    (ctx / "motd").write_text("hello from the Containerfile\n")
    _run([*podman, "build", "--isolation", "chroot", "-t", "localhost/os:2", str(ctx)])
    archive = tmp_path / "os.tar"
    _run([*podman, "save", "--format", "docker-archive", "-o", str(archive), "localhost/os:2"])
    _run([*podman, "create", "--name", "export-me", "localhost/os:2", "/bin/sh"])
    exported = tmp_path / "export.tar"
    _run([*podman, "export", "-o", str(exported), "export-me"])
    _run([*podman, "rm", "export-me"])
    expected_root = tmp_path / "exported"
    expected_root.mkdir()
    _run(["tar", "-C", str(expected_root), "--numeric-owner", "--xattrs", "-xpf", str(exported)])
    expected = summary(expected_root)
    assert expected["etc/motd"][3] is not None
    assert "etc/removed" not in expected
    for fs in ("ext4", "erofs"):
        out = tmp_path / f"os.{fs}"
        build_image(f"docker-archive:{archive}", out, fs)
        with mounted(out, tmp_path / f"mnt-{fs}", fs) as root:
            got = summary(root)
        assert got == expected, fs
