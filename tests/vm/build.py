"""Builds the virtual device's disk image (`make vm`): Debian bookworm from
Debian packages, the edge-ota .deb installed, GRUB (i386-pc, BIOS) with the
project's slot-choosing snippet, two root slots and a data partition.

    p1  bios       1 MiB     GRUB's core.img (BIOS boot partition)
    p2  boot       32 MiB    ext4: grub.cfg, ota.cfg (hw/scripts/grub.cfg), grubenv,
                             GRUB modules; the guest mounts it at /boot/grub
    p3  rootfs_a   slot A    ext4 image of the root filesystem (v1)
    p4  rootfs_b   slot B    the same v1 image (a freshly provisioned device)
    p5  data       64 MiB    ext4: /var/lib/edge-ota, the agent's state

Nothing is mounted and no loop device is used: the file systems are made
from directories with `mkfs.ext4 -d`, the disk is assembled with sfdisk and
dd, GRUB's boot sector and core.img are written the way grub-bios-setup
writes them for a BIOS boot partition (a block list). Only the chroot that
installs the .deb and rebuilds the initramfs needs root (and /proc, /sys,
/dev bind mounts, undone in every case).

The result is cached under the cache directory (tests/vm/paths.py) by the
content hash of its inputs: this checkout's source, units, packaging, the
image's own files in tests/vm (build.py, paths.py, mkbase.sh, guest/; not
the tests), and the base tarball's key. `python -m tests.vm.build` prints
the image directory; a second run with nothing changed answers in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.state import AgentState, SlotRecord, StateStore
from hw.bootloader.grub import GrubEnv
from tests.vm import paths

GUEST = paths.HERE / "guest"
MIB = 1 << 20
SECTOR = 512
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BOOT_MIB, DATA_MIB = 32, 64
V1 = "1.0.0"
COMPATIBLE = "edge-ota-vm"
# Kernel modules the device keeps (the rest of linux-image's 400 MB goes):
# virtio disks/net, ext4, FAT and USB storage for sticks, the watchdog.
KEEP_MODULES = (
    "kernel/drivers/virtio",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/watchdog",
    "kernel/drivers/usb/storage",
    "kernel/drivers/usb/host",
    "kernel/drivers/usb/common",
    "kernel/drivers/usb/core",
    "kernel/drivers/scsi/sd_mod.ko",
    "kernel/drivers/scsi/scsi_mod.ko",
    "kernel/drivers/scsi/scsi_common.ko",
    "kernel/fs/ext4",
    "kernel/fs/jbd2",
    "kernel/fs/mbcache.ko",
    "kernel/fs/fat",
    "kernel/fs/nls",
    "kernel/lib",
    "kernel/block",
    "kernel/crypto",
    "kernel/arch/x86/crypto",
)
INPUTS = (
    "agent",
    "bundler",
    "hw",
    "ota_common",
    "systemd",
    "packaging",
    # The image's own build inputs, not the tests that drive it (editing a
    # scenario must not rebuild the image).
    "tests/vm/build.py",
    "tests/vm/paths.py",
    "tests/vm/mkbase.sh",
    "tests/vm/guest",
    "pyproject.toml",
    "README.md",
    "docs",
)


@dataclass(frozen=True)
class Image:
    """What a built image is: where, its slots' geometry, the v1 root image."""

    kernel: str
    slot_bytes: int
    rootfs_sha256: str
    partitions: dict[str, list[int]]  # name -> [start sector, sectors]
    directory: str = ""

    @property
    def disk(self) -> Path:
        return Path(self.directory) / "disk.img"

    @property
    def rootfs(self) -> Path:
        """The v1 root file system image (what slots A and B hold)."""
        return Path(self.directory) / "rootfs-v1.ext4"

    @classmethod
    def load(cls, directory: Path) -> Image:
        fields = json.loads((directory / "image.json").read_text())
        return cls(**fields, directory=str(directory))


def _run(*argv: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def inputs_key(base: Path) -> str:
    """The content hash of every file the image is made from."""
    listed = _run("git", "-C", paths.TOP, "ls-files", "-co", "--exclude-standard", "-z", "--", *INPUTS).stdout
    h = hashlib.sha256(base.name.encode())
    for rel in sorted(p for p in listed.split("\0") if p):
        f = paths.TOP / rel
        if f.is_file() and "__pycache__" not in rel:
            h.update(rel.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def signing_keys() -> Path:
    """The VM's bundle signing key pair (made once per cache directory)."""
    keys = paths.cache_dir() / "keys"
    if not (keys / "signing.pub").exists():
        keys.mkdir(parents=True, exist_ok=True)
        _run(sys.executable, "-m", "bundler.cli", "keygen", keys, cwd=paths.TOP)
    return keys


class _Chroot:
    """/proc, /sys and /dev inside `root` for the duration of a with block."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    def __enter__(self) -> _Chroot:
        try:
            for src, args in (
                ("proc", ["-t", "proc", "proc"]),
                ("sys", ["-t", "sysfs", "sys"]),
                ("dev", ["--bind", "/dev"]),
            ):
                target = self.root / src
                target.mkdir(exist_ok=True)
                _run("mount", *args, target)
                self.mounted.append(target)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for target in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)
        self.mounted.clear()

    def run(self, *argv: str) -> str:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
        done = subprocess.run(["chroot", str(self.root), *argv], text=True, capture_output=True, env=env, check=False)
        if done.returncode:
            raise RuntimeError(f"chroot {' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        return done.stdout


def _install(src: Path, dst: Path, mode: int = 0o644) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def _make_rootfs(root: Path, deb: Path, keys: Path) -> str:
    """Configures the extracted base in `root` into the device's v1 root; returns the kernel version."""
    shutil.copyfile(deb, root / "tmp" / deb.name)
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    (root / "usr/sbin/policy-rc.d").chmod(0o755)
    _install(GUEST / "vm-health", root / "usr/local/sbin/vm-health", 0o755)
    _install(GUEST / "fstab", root / "etc/fstab")
    _install(GUEST / "10-dhcp.network", root / "etc/systemd/network/10-dhcp.network")
    _install(GUEST / "autologin.conf", root / "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf")
    _install(GUEST / "vm-version.service", root / "etc/systemd/system/vm-version.service")
    _install(GUEST / "vm-block.service", root / "etc/systemd/system/vm-block.service")
    (root / "etc/edge-ota-vm").mkdir(exist_ok=True)
    (root / "etc/edge-ota-vm/version").write_text(V1 + "\n")
    (root / "etc/hostname").write_text("edge-ota-vm\n")
    (root / "etc/initramfs-tools/modules").write_text("virtio_pci\nvirtio_blk\next4\n")
    conf = root / "etc/initramfs-tools/initramfs.conf"
    conf.write_text(conf.read_text().replace("MODULES=most", "MODULES=list"))
    for d in ("boot/grub", "var/lib/edge-ota"):
        (root / d).mkdir(parents=True, exist_ok=True)
    kver = sorted(p.name for p in (root / "lib/modules").iterdir())[-1]
    with _Chroot(root) as ch:
        ch.run("dpkg", "-i", f"/tmp/{deb.name}")
        _install(GUEST / "agent.toml", root / "etc/edge-ota/agent.toml")
        _install(keys / "signing.pub", root / "etc/edge-ota/keys/signing.pub")
        ch.run("passwd", "-d", "root")
        ch.run("systemctl", "enable", "systemd-networkd.service", "vm-version.service", "vm-block.service")
        mods = root / "lib/modules" / kver
        keep = root / "tmp/keep-modules"
        keep.mkdir()
        for rel in KEEP_MODULES:
            if (mods / rel).exists():
                (keep / rel).parent.mkdir(parents=True, exist_ok=True)
                (mods / rel).rename(keep / rel)
        shutil.rmtree(mods / "kernel")
        (keep / "kernel").rename(mods / "kernel")
        ch.run("depmod", "-a", kver)
        ch.run("update-initramfs", "-u", "-k", kver)
    for junk in ("tmp", "usr/share/man", "usr/share/locale", "usr/share/info", "var/cache/apt", "var/lib/apt/lists"):
        target = root / junk
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir()
    (root / "tmp").chmod(0o1777)
    docs = root / "usr/share/doc"
    for doc in docs.iterdir():
        if doc.name != "edge-ota":
            shutil.rmtree(doc) if doc.is_dir() and not doc.is_symlink() else doc.unlink()
    (root / "usr/sbin/policy-rc.d").unlink()
    (root / "etc/machine-id").write_text("")
    return kver


def _mkfs(directory: Path, image: Path, size: int, label: str) -> None:
    image.unlink(missing_ok=True)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))
    _run("mkfs.ext4", "-q", "-F", "-L", label, "-d", directory, image, f"{size // 1024}k", env=env)


def _write_at(disk: Path, offset: int, src: Path) -> None:
    _run(
        "dd",
        f"if={src}",
        f"of={disk}",
        "bs=1M",
        f"seek={offset}",
        "oflag=seek_bytes",
        "conv=notrunc,sparse",
        "status=none",
    )


def _grub_bios_setup(disk: Path, core: Path, start_sector: int) -> None:
    """What grub-bios-setup does for a core.img in a BIOS boot partition: the
    boot sector learns core.img's first sector, core.img's first sector
    (diskboot) the block list of the rest."""
    boot = bytearray(Path("/usr/lib/grub/i386-pc/boot.img").read_bytes())
    body = bytearray(core.read_bytes())
    sectors = -(-len(body) // SECTOR)
    body += bytes(sectors * SECTOR - len(body))
    struct.pack_into("<Q", boot, 0x5C, start_sector)  # GRUB_BOOT_MACHINE_KERNEL_SECTOR
    struct.pack_into("<QHH", body, SECTOR - 12, start_sector + 1, sectors - 1, 0x820)  # diskboot block list
    with disk.open("r+b") as f:
        f.seek(0)
        f.write(boot[:440])  # keep the disk signature and the protective MBR's partition table
        f.seek(start_sector * SECTOR)
        f.write(body)


def build(out: Path, base: Path, keys: Path, work: Path) -> Image:
    deb = paths.build_deb(work / "deb")
    root = work / "root"
    root.mkdir()
    _run("tar", "-C", root, "--numeric-owner", "-xf", base)
    kver = _make_rootfs(root, deb, keys)
    used = int(_run("du", "-s", "--block-size=1", root).stdout.split()[0])
    slot_bytes = -(-(used * 13 // 10 + 64 * MIB) // (16 * MIB)) * 16 * MIB
    out.mkdir(parents=True)
    rootfs = out / "rootfs-v1.ext4"
    _mkfs(root, rootfs, slot_bytes, "rootfs")

    boot = work / "bootfs"
    shutil.copytree(
        "/usr/lib/grub/i386-pc", boot / "i386-pc", ignore=shutil.ignore_patterns("*.img", "*.image", "*.exec", "grub-*")
    )
    shutil.copyfile(GUEST / "grub.cfg", boot / "grub.cfg")
    shutil.copyfile(paths.TOP / "hw/scripts/grub.cfg", boot / "ota.cfg")
    GrubEnv(boot / "grubenv", ("A", "B")).create()
    bootimg = work / "boot.ext4"
    _mkfs(boot, bootimg, BOOT_MIB * MIB, "boot")

    data = work / "datafs"
    state_dir = data
    state_dir.mkdir()
    state_dir.chmod(0o700)
    digest = hashlib.sha256(rootfs.read_bytes()).hexdigest()
    records = {b: SlotRecord(V1, digest, 0, None, {"rootfs": digest}) for b in ("A", "B")}
    StateStore(state_dir).save(AgentState(slots=records))
    dataimg = work / "data.ext4"
    _mkfs(data, dataimg, DATA_MIB * MIB, "data")

    core = work / "core.img"
    _run("grub-mkimage", "-O", "i386-pc", "-o", core, "-p", "(hd0,gpt2)/", "biosdisk", "part_gpt", "ext2")
    layout = [
        ("bios", BIOS_BOOT, MIB),
        ("boot", LINUX_FS, BOOT_MIB * MIB),
        ("rootfs_a", LINUX_FS, slot_bytes),
        ("rootfs_b", LINUX_FS, slot_bytes),
        ("data", LINUX_FS, DATA_MIB * MIB),
    ]
    parts: dict[str, list[int]] = {}
    start = MIB // SECTOR
    for name, _, size in layout:
        parts[name] = [start, size // SECTOR]
        start += size // SECTOR
    disk = out / "disk.img"
    with disk.open("wb") as f:
        f.truncate((start + 2048) * SECTOR)
    table = "label: gpt\n" + "".join(
        f"start={parts[n][0]}, size={parts[n][1]}, type={t}, name={n}\n" for n, t, _ in layout
    )
    _run("sfdisk", "-q", disk, input=table)
    _grub_bios_setup(disk, core, parts["bios"][0])
    for name, img in (("boot", bootimg), ("rootfs_a", rootfs), ("rootfs_b", rootfs), ("data", dataimg)):
        _write_at(disk, parts[name][0] * SECTOR, img)
    image = Image(kver, slot_bytes, digest, parts)
    fields = asdict(image)
    del fields["directory"]
    (out / "image.json").write_text(json.dumps(fields, indent=1) + "\n")
    return Image.load(out)


def _prune(keep: Path, count: int = 2) -> None:
    """Old images (each ~1 GB sparse) go; the newest `count` stay."""
    images = sorted(paths.cache_dir().glob("vm-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in images if p != keep][count - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_image() -> Image:
    """The cached image for this checkout, built when its inputs changed."""
    base = paths.base_tarball()
    with paths.exclusive(paths.IMAGE):  # another worker building the same image: wait, then load it
        keys = signing_keys()
        out = paths.cache_dir() / f"vm-{inputs_key(base)}"
        if (out / "image.json").exists():
            return Image.load(out)
        tmp = Path(tempfile.mkdtemp(prefix="build.", dir=paths.cache_dir()))
        try:
            staging = tmp / "out"
            build(staging, base, keys, tmp)
            staging.rename(out)
            _prune(keep=out)
            return Image.load(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    image = ensure_image()
    print(image.directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
