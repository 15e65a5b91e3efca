"""Building without root (as `nobody`): an image whose entries all belong to
root, without device nodes, becomes an ext4, erofs or squashfs image owned by
root throughout; an entry owned by someone else, or a device node, is refused
naming it. Memory stays bounded whatever the layer size."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.oci._images import E, write_layout
from tests.oci._trees import mounted, summary

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody and to mount the result")
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
ROOT = Path(__file__).resolve().parents[2]

ROOT_OWNED = [
    E("etc", "dir", mode=0o755),
    E("etc/hostname", data=b"edge\n"),
    E("usr", "dir", mode=0o755),
    E("usr/bin", "dir", mode=0o755),
    E("usr/bin/su", data=b"ELF", mode=0o4755),
    E("bin", "symlink", link="usr/bin"),
    E("run", "dir", mode=0o755),
    E("run/fifo", "fifo", mode=0o600),
]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory `nobody` can reach and write (pytest's own tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="ota-nobody-", dir="/tmp"))
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [*NOBODY, sys.executable, "-m", "bundler.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)


@pytest.mark.parametrize("fs", ["ext4", "erofs", "squashfs"])
def test_a_root_owned_image_builds_without_root_and_is_owned_by_root(tmp_path: Path, open_dir: Path, fs: str) -> None:
    layout = write_layout(open_dir / "layout", [ROOT_OWNED])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    out = open_dir / f"rootfs.{fs}"
    done = _as_nobody("image", "--from-oci", f"oci:{layout}:1", "--fs", fs, "-o", str(out))
    assert done.returncode == 0, done.stderr
    with mounted(out, tmp_path / "mnt", fs) as root:
        tree = summary(root)
    assert {uid for _, uid, _, _, _ in tree.values()} == {0}
    assert {gid for _, _, gid, _, _ in tree.values()} == {0}
    assert tree["usr/bin/su"][0] == oct(0o104755)
    assert tree["run/fifo"][0] == oct(0o10600)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (E("home", "dir", uid=1000, gid=1000), "owner 1000:1000 can be kept only when building as root"),
        (E("dev-null", "chr", dev=(1, 3)), "a device node needs root"),
    ],
)
def test_without_root_what_cannot_be_kept_is_refused_by_name(open_dir: Path, entry: E, reason: str) -> None:
    layout = write_layout(open_dir / "layout", [[*ROOT_OWNED, entry]])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    out = open_dir / "rootfs.ext4"
    done = _as_nobody("image", "--from-oci", f"oci:{layout}:1", "-o", str(out))
    assert done.returncode == 1
    assert f"entry {entry.name!r}: {reason}" in done.stderr
    assert not out.exists()


# VmHWM, the peak of this process's own memory since exec (ru_maxrss would carry
# the forking pytest's size across the exec)
MEASURE = """
import sys
from pathlib import Path
from bundler.oci.image import build_image
build_image(sys.argv[1], Path(sys.argv[2]), "ext4")
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def test_memory_stays_bounded_whatever_the_layer_size(tmp_path: Path) -> None:
    """A 192 MiB file in a gzip layer: the build's peak RSS (this process, not mkfs) stays small."""
    big = tmp_path / "big.tar.gz"
    layout = write_layout(tmp_path / "layout", [[E("etc", "dir"), E("etc/small", data=b"x")]])
    subprocess.run(
        f"cd {tmp_path} && mkdir -p t/srv && head -c {192 << 20} /dev/zero > t/srv/big && "
        f"tar --owner=0 --group=0 -C t -cf - srv | gzip -1 > {big} && rm -rf t",
        shell=True,
        check=True,
    )
    _add_layer(layout, big)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, f"oci:{layout}:1", str(tmp_path / "out.ext4")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    peak_kib = json.loads(done.stdout)
    assert peak_kib < 64 * 1024, f"peak RSS {peak_kib} KiB"
    assert (tmp_path / "out.ext4").stat().st_size > 192 << 20


def _add_layer(layout: Path, blob: Path) -> None:
    """Append a gzip layer (its diff_id from the uncompressed bytes) to the layout's image."""

    def sha(f: IO[bytes]) -> str:
        h = hashlib.sha256()
        with f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest()

    blobs = layout / "blobs/sha256"
    digest = sha(blob.open("rb"))
    os.rename(blob, blobs / digest.split(":")[1])
    diff_id = sha(gzip.open(blobs / digest.split(":")[1], "rb"))  # type: ignore[arg-type]  # noqa: SIM115 - sha closes it
    index = json.loads((layout / "index.json").read_text())
    mpath = blobs / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(mpath.read_text())
    cpath = blobs / manifest["config"]["digest"].split(":")[1]
    config = json.loads(cpath.read_text())
    config["rootfs"]["diff_ids"].append(diff_id)
    cdata = json.dumps(config).encode()
    cdigest = "sha256:" + hashlib.sha256(cdata).hexdigest()
    (blobs / cdigest.split(":")[1]).write_bytes(cdata)
    manifest["config"].update(digest=cdigest, size=len(cdata))
    size = (blobs / digest.split(":")[1]).stat().st_size
    manifest["layers"].append(
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}
    )
    mdata = json.dumps(manifest).encode()
    mdigest = "sha256:" + hashlib.sha256(mdata).hexdigest()
    (blobs / mdigest.split(":")[1]).write_bytes(mdata)
    index["manifests"][0].update(digest=mdigest, size=len(mdata))
    (layout / "index.json").write_text(json.dumps(index))
