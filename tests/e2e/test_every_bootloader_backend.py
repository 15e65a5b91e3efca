"""The same update cycle on every bootloader backend, with the bootloader state
kept in the bootloader's own format and cross-checked with its real tool:
`fw_printenv` (U-Boot), `grub-editenv` (GRUB), and the BLS entry file names."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, DeviceFactory, Images, KeyPair

BACKENDS = ["sim", "uboot", "grub", "bls"]
TOOLS = {"uboot": "fw_printenv", "grub": "grub-editenv"}


def bootloader_view(device: SimDevice, backend: str) -> str:
    """The bootloader state as the bootloader's own tool shows it."""
    if backend == "uboot":
        out = subprocess.run(
            ["fw_printenv", "-c", str(device.dir / "fw_env.config")], capture_output=True, text=True, check=True
        )
        return out.stdout
    if backend == "grub":
        cmd = ["grub-editenv", str(device.dir / "grubenv"), "list"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return out.stdout
    if backend == "bls":
        return "\n".join(sorted(p.name for p in (device.dir / "boot/loader/entries").iterdir()))
    return (device.dir / "bootloader.json").read_text()


def bootloader_bytes(device: SimDevice, backend: str) -> dict[str, bytes]:
    paths = {"sim": ["bootloader.json"], "uboot": ["uboot.env"], "grub": ["grubenv"]}.get(backend)
    if paths is None:
        root = device.dir / "boot"
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {name: (device.dir / name).read_bytes() for name in paths}


@pytest.fixture(params=BACKENDS)
def backend_device(request: pytest.FixtureRequest, make_device: DeviceFactory) -> tuple[str, SimDevice]:
    backend: str = request.param
    tool = TOOLS.get(backend)
    if tool and not shutil.which(tool):
        pytest.skip(f"{tool} not installed (make test installs it)")
    return backend, make_device(name=backend, bootloader=backend)


def test_install_commit_then_failed_trial_rolls_back_on_every_backend(
    backend_device: tuple[str, SimDevice], make_bundle: BundleFactory, images: Images
) -> None:
    backend, device = backend_device
    device.install_ok(make_bundle("2.0", security_version=2))
    assert device.status()["primary"] == "B"
    device.boot()
    status = device.status()
    assert status["booted"] == "B"
    assert status["slots"]["B"]["boot_state"] == "good"
    assert status["committed_security_version"] == 2
    committed = bootloader_view(device, backend)

    device.install_ok(make_bundle("3.0", security_version=3, image=images.v3))
    assert bootloader_view(device, backend) != committed
    device.boot(health="fail")
    status = device.status()
    assert status["booted"] == "B"
    assert status["primary"] == "B"
    assert status["slots"]["A"]["boot_state"] == "bad"
    assert status["last_result"]["event"] == "rollback"

    view = bootloader_view(device, backend)
    if backend == "uboot":
        assert "BOOT_ORDER=A B" in view  # A was made primary for its trial, then marked bad
        assert "BOOT_A_LEFT=0" in view
    elif backend == "grub":
        assert "A_OK=0" in view
        assert "B_OK=1" in view
    elif backend == "bls":
        assert any(name.endswith("-A+0.conf") for name in view.splitlines())


def test_refused_bundle_leaves_the_bootloader_state_byte_for_byte_unchanged_on_every_backend(
    backend_device: tuple[str, SimDevice], make_bundle: BundleFactory, other_key: KeyPair
) -> None:
    backend, device = backend_device
    before = bootloader_bytes(device, backend)
    run = device.install(make_bundle("2.0", key=other_key))
    assert "none of which is in the keyring" in run.one_error_line()
    assert bootloader_bytes(device, backend) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trial_on_its_last_try_is_assessed_and_commits_on_every_backend(
    make_device: DeviceFactory, make_bundle: BundleFactory, backend: str
) -> None:
    # With one try, the only trial boot is also the last: systemd-boot boots it as "+0-1".
    tool = TOOLS.get(backend)
    if tool and not shutil.which(tool):
        pytest.skip(f"{tool} not installed (make test installs it)")
    device = make_device(name=backend, bootloader=backend, tries=1)
    device.install_ok(make_bundle("2.0", security_version=2))
    run = device.boot()
    assert "committed" in run.out
    status = device.status()
    assert (status["booted"], status["slots"]["B"]["boot_state"]) == ("B", "good")
    assert status["committed_security_version"] == 2
