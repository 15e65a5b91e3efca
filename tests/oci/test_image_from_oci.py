"""`ota-bundle image --from-oci`: OCI layouts and docker archives built here,
their layers applied (whiteouts, opaque directories, hardlinks, xattrs, device
nodes, owners, modes), made into ext4, erofs and squashfs images that are
mounted and compared; the same input gives the same bytes; entries that
escape the root and blobs whose digest lies are refused and leave nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from bundler.oci.errors import DigestMismatch, OciError, UnsafeEntry
from bundler.oci.image import build_image
from tests.oci._images import E, write_docker_archive, write_layout
from tests.oci._trees import mounted, summary

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: device nodes, owners, loop mounts")

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw=ep (VFS_CAP_REVISION_2)
FSTYPES = {"ext4": "ext4", "erofs": "erofs", "squashfs": "squashfs"}

BASE = [
    E("etc", "dir", mode=0o755),
    E("etc/hostname", data=b"base\n"),
    E("etc/motd", data=b"hello\n"),
    E("usr", "dir", mode=0o755),
    E("usr/bin", "dir", mode=0o755),
    E("usr/bin/ping", data=b"\x7fELF ping", mode=0o4755, xattrs={"security.capability": CAP}),
    E("usr/bin/ping4", "hardlink", link="usr/bin/ping"),
    E("bin", "symlink", link="usr/bin"),
    E("dev", "dir", mode=0o755),
    E("dev/null", "chr", mode=0o666, dev=(1, 3)),
    E("dev/loop0", "blk", mode=0o660, gid=6, dev=(7, 0)),
    E("run", "dir", mode=0o755),
    E("run/initctl", "fifo", mode=0o600),
    E("srv", "dir", mode=0o755),
    E("srv/old", "dir", mode=0o755),
    E("srv/old/a", data=b"lower a"),
    E("srv/old/sub", "dir", mode=0o755),
    E("srv/old/sub/b", data=b"lower b"),
    E("home", "dir", mode=0o755),
    E("home/user", "dir", mode=0o700, uid=1000, gid=1000),
    E("home/user/.profile", data=b"PS1=x", mode=0o600, uid=1000, gid=1000, xattrs={"user.note": b"kept"}),
    E("tmp", "dir", mode=0o1777),
]
TOP = [
    E("etc/.wh.motd"),  # deleted by the upper layer
    E("etc/hostname", data=b"top\n", mode=0o600),  # replaced
    E("srv/old/.wh..wh..opq"),  # opaque: the lower a and sub/ disappear
    E("srv/old/c", data=b"upper c"),
    E("etc/new", data=b"new default"),
    E("etc/.wh.new"),  # a whiteout never hides its own layer's entry
    E("usr/bin/ping6", "hardlink", link="usr/bin/ping"),  # a hardlink to a lower layer's file
]


def expected_after_layers() -> dict[str, tuple[object, ...]]:
    """What a correct apply gives, computed independently of the stager."""
    h = lambda b: hashlib.sha256(b).hexdigest()[:16]  # noqa: E731
    ping = (h(b"\x7fELF ping"), "linked-to", "usr/bin/ping")
    return {
        "bin": (oct(0o120777), 0, 0, "usr/bin", ()),
        "dev": (oct(0o40755), 0, 0, None, ()),
        "dev/loop0": (oct(0o60660), 0, 6, (7, 0), ()),
        "dev/null": (oct(0o20666), 0, 0, (1, 3), ()),
        "etc": (oct(0o40755), 0, 0, None, ()),
        "etc/hostname": (oct(0o100600), 0, 0, h(b"top\n"), ()),
        "etc/new": (oct(0o100644), 0, 0, h(b"new default"), ()),
        "home": (oct(0o40755), 0, 0, None, ()),
        "home/user": (oct(0o40700), 1000, 1000, None, ()),
        "home/user/.profile": (oct(0o100600), 1000, 1000, h(b"PS1=x"), (("user.note", b"kept"),)),
        "run": (oct(0o40755), 0, 0, None, ()),
        "run/initctl": (oct(0o10600), 0, 0, None, ()),
        "srv": (oct(0o40755), 0, 0, None, ()),
        "srv/old": (oct(0o40755), 0, 0, None, ()),
        "srv/old/c": (oct(0o100644), 0, 0, h(b"upper c"), ()),
        "tmp": (oct(0o41777), 0, 0, None, ()),
        "usr": (oct(0o40755), 0, 0, None, ()),
        "usr/bin": (oct(0o40755), 0, 0, None, ()),
        "usr/bin/ping": (oct(0o104755), 0, 0, ping, (("security.capability", CAP),)),
        "usr/bin/ping4": (oct(0o104755), 0, 0, ping, (("security.capability", CAP),)),
        "usr/bin/ping6": (oct(0o104755), 0, 0, ping, (("security.capability", CAP),)),
    }


def _source(tmp_path: Path, kind: str, layers: list[list[E]], **kw: object) -> str:
    if kind == "docker-archive":
        return f"docker-archive:{write_docker_archive(tmp_path / 'image.tar', layers, **kw)}"  # type: ignore[arg-type]
    compression = kind.split("-")[1]
    return f"oci:{write_layout(tmp_path / 'layout', layers, compression=compression, **kw)}:1"  # type: ignore[arg-type]


# every filesystem from one source kind, every source kind into ext4
CASES = [("oci-gzip", "ext4"), ("oci-gzip", "erofs"), ("oci-gzip", "squashfs")]
CASES += [("oci-zstd", "ext4"), ("oci-plain", "ext4"), ("docker-archive", "ext4")]


@pytest.mark.parametrize(("kind", "fs"), CASES)
def test_layers_become_a_filesystem_with_whiteouts_owners_modes_xattrs_links_and_devices(
    tmp_path: Path, kind: str, fs: str
) -> None:
    src = _source(tmp_path, kind, [BASE, TOP])
    out = tmp_path / f"rootfs.{fs}"
    result = build_image(src, out, fs)
    assert result.layers == 2
    assert result.stats.whiteouts == 3
    assert result.stats.devices == 2
    with mounted(out, tmp_path / "mnt", FSTYPES[fs]) as root:
        assert summary(root) == expected_after_layers()
        assert os.stat(root / "etc/hostname").st_mtime <= result.epoch


@pytest.mark.parametrize("fs", ["ext4", "erofs", "squashfs"])
def test_the_same_image_gives_the_same_bytes(tmp_path: Path, fs: str) -> None:
    src = _source(tmp_path, "oci-gzip", [BASE, TOP])
    digests = []
    for i in range(2):
        if i:
            time.sleep(1.05)  # the second build in another second: no field may come from the clock
        out = tmp_path / f"{i}.{fs}"
        build_image(src, out, fs)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_timestamps_are_clamped_to_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _source(tmp_path, "oci-gzip", [BASE, TOP])
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1600000000")
    result = build_image(src, tmp_path / "a.ext4", "ext4")
    assert result.epoch == 1600000000
    with mounted(tmp_path / "a.ext4", tmp_path / "mnt", "ext4") as root:
        times = {os.lstat(os.path.join(d, n)).st_mtime for d, ds, fs in os.walk(root) for n in ds + fs}
        assert times == {1600000000}  # every entry of the layers is newer, so all are clamped


def _nothing_left(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([E("/etc/passwd", data=b"x")], "absolute path"),
        ([E("etc", "dir"), E("etc/../../outside", data=b"x")], "'..' in the path"),
        ([E("etc", "symlink", link="/tmp"), E("etc/evil", data=b"x")], "parent 'etc' is a symlink"),
        ([E("up", "symlink", link=".."), E("up/x/y", data=b"x")], "parent 'up' is a symlink"),
        ([E("a", "dir"), E("a/.wh.x/../../z")], "'..' in the path"),
        ([E("link", "hardlink", link="../../etc/shadow")], "'..' in the path"),
        ([E("link", "hardlink", link="/etc/shadow")], "absolute path"),
        ([E("d", "dir"), E("link", "hardlink", link="d")], "is a directory"),
        ([E("s", "symlink", link="/etc"), E("link", "hardlink", link="s/shadow")], "parent 's' is a symlink"),
        ([E("link", "hardlink", link="nothing")], "does not exist"),
        ([E("f", data=b"x"), E("f/g", data=b"y")], "parent 'f' is not a directory"),
    ],
)
def test_entries_escaping_the_root_are_refused_and_nothing_is_written(
    tmp_path: Path, entries: list[E], reason: str
) -> None:
    outside = tmp_path / "outside"
    src = _source(tmp_path, "oci-gzip", [[E("etc", "dir"), E("etc/ok", data=b"ok")], entries])
    out = tmp_path / "out" / "rootfs.ext4"
    out.parent.mkdir()
    with pytest.raises(UnsafeEntry, match=reason):
        build_image(src, out, "ext4")
    _nothing_left(tmp_path, out)
    assert not outside.exists()


@pytest.mark.parametrize("kind", ["oci-gzip", "oci-plain", "docker-archive"])
def test_a_blob_whose_digest_lies_is_refused_and_nothing_is_written(tmp_path: Path, kind: str) -> None:
    src = _source(tmp_path, kind, [BASE, TOP], lie_about=0)
    out = tmp_path / "out" / "rootfs.ext4"
    out.parent.mkdir()
    with pytest.raises(DigestMismatch, match="digest mismatch"):
        build_image(src, out, "ext4")
    _nothing_left(tmp_path, out)


def test_a_layer_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "layout", [BASE], compression="gzip")
    blob = next(p for p in (layout / "blobs/sha256").iterdir() if p.read_bytes()[:2] == b"\x1f\x8b")
    blob.write_bytes(b"\x1f\x8bnot gzip at all")  # the digest now lies too; the codec fails first or the digest does
    with pytest.raises(OciError, match="layer"):
        build_image(f"oci:{layout}:1", tmp_path / "x.ext4", "ext4")
    assert not (tmp_path / "x.ext4").exists()


def test_unknown_tag_and_missing_layout_name_the_problem(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "layout", [BASE], tag="v1")
    with pytest.raises(OciError, match="no image tagged 'v2'"):
        build_image(f"oci:{layout}:v2", tmp_path / "x.ext4")
    with pytest.raises(OciError, match="not an OCI image layout"):
        build_image(f"oci:{tmp_path}/nothing", tmp_path / "x.ext4")
    with pytest.raises(OciError, match="unknown transport"):
        build_image("ftp://x/y", tmp_path / "x.ext4")


def test_an_ext4_size_too_small_is_a_clear_error(tmp_path: Path) -> None:
    big = [E("big", data=os.urandom(6 << 20))]
    src = _source(tmp_path, "oci-plain", [big])
    with pytest.raises(OciError, match="--size"):
        build_image(src, tmp_path / "x.ext4", "ext4", 4 << 20)
    assert not (tmp_path / "x.ext4").exists()


def test_an_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    src = _source(tmp_path, "oci-gzip", [BASE])
    out = tmp_path / "x.ext4"
    out.write_bytes(b"keep me")
    with pytest.raises(OciError, match="exists"):
        build_image(src, out)
    assert out.read_bytes() == b"keep me"
    build_image(src, out, overwrite=True)
    assert out.stat().st_size > 1 << 20


def test_missing_tool_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _source(tmp_path, "oci-gzip", [BASE])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(OciError, match="install the erofs-utils package"):
        build_image(src, tmp_path / "x.erofs", "erofs")
    assert shutil.which("mkfs.erofs") is None


def test_factory_etc_copies_the_images_etc_for_the_next_merge(tmp_path: Path) -> None:
    src = _source(tmp_path, "oci-gzip", [BASE, [*TOP, E("etc/ssl", "dir", mode=0o700), E("etc/ssl/key", uid=7)]])
    out = tmp_path / "rootfs.ext4"
    build_image(src, out, "ext4", factory_etc=True)
    with mounted(out, tmp_path / "mnt", "ext4") as root:
        etc = summary(root / "etc")
        assert summary(root / "usr/share/factory/etc") == etc
        assert etc["ssl/key"][1] == 7
