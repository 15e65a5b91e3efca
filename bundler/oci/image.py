"""`ota-bundle image --from-oci`: a container image made into a filesystem
image. Reads the image (`bundler.oci.source`), applies its layers to a staging
tree in a private temporary directory beside the output (`bundler.oci.apply`),
builds the filesystem (`bundler.oci.mkfs`) and only then moves it into place;
the staging tree and any partial image are removed whatever happens.

Reproducible: every timestamp is clamped to one epoch (`SOURCE_DATE_EPOCH`
when set, else the image config's `created`, else 0) and the filesystem UUID
and hash seed derive from the image config's digest, so the same image gives
the same bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from bundler.oci import mkfs
from bundler.oci.apply import Stager, Stats
from bundler.oci.errors import OciError
from bundler.oci.registry import RegistryOptions, pull_to_layout
from bundler.oci.source import DockerArchive, Image, load_layout, parse_ref


@dataclass(frozen=True, slots=True)
class ImageResult:
    output: Path
    fs: str
    size: int
    epoch: int
    config_digest: str
    layers: int
    stats: Stats


def load(
    value: str, *, workdir: Path, registry_options: RegistryOptions | None = None, want: tuple[str, str] | None = None
) -> Image:
    """The image `value` names. A registry image is first copied (verified)
    into a layout under `workdir`, which the caller removes."""
    ref = parse_ref(value)
    if ref.transport == "oci":
        return load_layout(Path(ref.path), ref.tag, value, want)
    if ref.transport == "docker-archive":
        if not os.path.isfile(ref.path):
            raise OciError(f"docker-archive:{ref.path}: no such file")
        return DockerArchive(Path(ref.path)).load(value)
    layout = workdir / "pulled"
    tag = pull_to_layout(ref, layout, registry_options, want)
    return load_layout(layout, tag, value, want)


def build_epoch(image: Image) -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value:
        if not value.isdigit():
            raise OciError(f"SOURCE_DATE_EPOCH={value[:40]!r} is not a number of seconds")
        return int(value)
    created = image.created
    return max(0, int(created.timestamp())) if created is not None else 0


def fs_uuid(config_digest: str, fs: str) -> uuid.UUID:
    return uuid.UUID(bytes=hashlib.sha256(f"{config_digest} {fs}".encode()).digest()[:16], version=4)


def build_image(
    src: str,
    out: Path,
    fs: str = "ext4",
    size: int | None = None,
    *,
    overwrite: bool = False,
    registry: RegistryOptions | None = None,
    factory_etc: bool = False,
) -> ImageResult:
    mkfs.check_tools(fs)
    if out.exists() and not overwrite:
        raise OciError(f"-o: {out} exists (use --force to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as e:
        raise OciError(f"-o: cannot write beside {out}: {e.strerror}") from None
    try:
        image = load(src, workdir=work, registry_options=registry)
        try:
            return _build(image, out, fs, size, work, overwrite=overwrite, factory_etc=factory_etc)
        finally:
            image.close()
    except OSError as e:
        raise OciError(f"building the image: {e.strerror}: {e.filename}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(
    image: Image, out: Path, fs: str, size: int | None, work: Path, *, overwrite: bool, factory_etc: bool
) -> ImageResult:
    epoch = build_epoch(image)
    staging = work / "rootfs"
    staging.mkdir(mode=0o755)
    stager = Stager(staging, epoch)
    for layer in image.layers:
        stager.apply(layer)
    if factory_etc:
        copy_factory_etc(staging)
    stager.finish()
    tmp = work / f"image.{fs}"
    uid = fs_uuid(image.config_digest, fs)
    length = mkfs.make(fs, staging, tmp, size, epoch=epoch, fs_uuid=uid, staged_as_root=stager.privileged)
    if overwrite:
        os.replace(tmp, out)
    else:
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise OciError(f"-o: {out} appeared while building (use --force to replace it)") from None
    return ImageResult(out, fs, length, epoch, image.config_digest, len(image.layers), stager.stats)


FACTORY_ETC = ("usr", "share", "factory", "etc")


def copy_factory_etc(root: Path) -> None:
    """`--factory-etc`: the image's /etc copied to /usr/share/factory/etc (the
    systemd convention), the pristine defaults the device's /etc merge compares
    against on the next update (`agent.etcmerge`). Owners, modes, times, symlinks
    and device nodes are kept; nothing is followed."""
    src = root / "etc"
    if not src.is_dir() or src.is_symlink():
        raise OciError("--factory-etc: the image has no /etc directory")
    parent = root.joinpath(*FACTORY_ETC[:-1])
    for i in range(1, len(FACTORY_ETC)):
        p = root.joinpath(*FACTORY_ETC[:i])
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise OciError(f"--factory-etc: /{'/'.join(FACTORY_ETC[:i])} is not a directory")
    parent.mkdir(parents=True, exist_ok=True)
    dst = parent / "etc"
    if dst.exists() or dst.is_symlink():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for name in [".", *dirs, *files]:
            a, b = Path(dirpath, name), dst / rel / name
            st = os.lstat(a)
            if os.geteuid() == 0:
                os.chown(b, st.st_uid, st.st_gid, follow_symlinks=False)
            if not a.is_symlink():
                os.chmod(b, st.st_mode & 0o7777)
