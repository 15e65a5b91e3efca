"""The happy path on a simulated device: install a bundle (from a file, from a
pipe on stdin, from an http:// URL), see the new slot primary on trial, power
on, let boot-check commit it, and find the image byte-exact in the slot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, HttpServer, Image, Images

SECURITY_VERSION = 7


def assert_installed_on_trial(dev: SimDevice, image: Image, version: str, *, target: str = "B") -> None:
    doc = dev.status()
    booted = "A" if target == "B" else "B"
    assert doc["booted"] == booted
    assert doc["primary"] == target
    slot = doc["slots"][target]
    assert slot["boot_state"] == "trial"
    assert slot["tries_left"] == 3
    assert slot["bootable"] is True
    assert slot["version"] == version
    assert slot["sha256"] == image.sha256
    assert doc["trial"]["slot"] == target
    assert doc["last_result"]["event"] == "install"
    assert doc["last_result"]["result"] == "ok"
    assert doc["last_result"]["bundle_version"] == version


def assert_boots_and_commits(dev: SimDevice, image: Image, version: str, *, target: str = "B") -> None:
    floor_before = dev.status()["committed_security_version"]
    assert floor_before < SECURITY_VERSION
    run = dev.boot()
    assert f"settled on slot {target} after 1 boot(s)" in run.out
    doc = dev.status()
    assert {"booted", "primary", "slots", "last_result"} <= doc.keys()
    assert doc["booted"] == target
    assert doc["primary"] == target
    for name, slot in doc["slots"].items():
        assert {"path", "bootable", "version"} <= slot.keys()
        assert slot["path"] == str(dev.slot_path(name))
    assert doc["slots"][target]["boot_state"] == "good"
    assert doc["slots"][target]["bootable"] is True
    assert doc["slots"][target]["version"] == version
    assert doc["committed_security_version"] == SECURITY_VERSION
    assert doc["trial"] is None
    last = doc["last_result"]
    assert (last["event"], last["result"], last["slot"], last["bundle_version"]) == ("commit", "ok", target, version)
    assert dev.slot_image_sha256(target, image.size) == image.sha256


def test_install_from_file_then_boot_commits_the_new_slot_and_leaves_the_booted_one_alone(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    bundle = make_bundle("2.0", security_version=SECURITY_VERSION)
    before = device.snapshot()
    run = device.install(bundle)
    assert run.rc == 0, run.err
    assert "installed version 2.0 into slot B" in run.out
    assert device.snapshot().slot("A") == before.slot("A")
    assert_installed_on_trial(device, images.v2, "2.0")
    assert_boots_and_commits(device, images.v2, "2.0")
    assert device.snapshot().slot("A") == before.slot("A")


def test_install_from_a_pipe_on_stdin_then_boot_commits(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    bundle = make_bundle("2.0", security_version=SECURITY_VERSION)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "-c", str(device.config), "install", "-"],
        input=bundle.read_bytes(),  # through a real pipe: not seekable, no length known
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"installed version 2.0 into slot B" in proc.stdout
    assert_installed_on_trial(device, images.v2, "2.0")
    assert_boots_and_commits(device, images.v2, "2.0")


def test_install_from_http_url_then_boot_commits(
    device: SimDevice, make_bundle: BundleFactory, images: Images, http_server: HttpServer
) -> None:
    name = http_server.publish(make_bundle("2.0", security_version=SECURITY_VERSION), "update.otab")
    device.install_ok(http_server.url(name))
    assert_installed_on_trial(device, images.v2, "2.0")
    assert_boots_and_commits(device, images.v2, "2.0")


def test_next_update_goes_into_the_other_slot_once_the_first_is_committed(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    device.install_ok(make_bundle("2.0", security_version=SECURITY_VERSION))
    device.boot()
    b_after_commit = device.snapshot().slot("B")
    # v3 is shorter than v2: the old tail beyond it must not matter.
    device.install_ok(make_bundle("3.0", security_version=SECURITY_VERSION, image=images.v3))
    assert device.snapshot().slot("B") == b_after_commit
    assert_installed_on_trial(device, images.v3, "3.0", target="A")
    run = device.boot()
    assert "settled on slot A" in run.out
    doc = device.status()
    assert doc["booted"] == "A"
    assert doc["slots"]["A"]["boot_state"] == "good"
    assert doc["slots"]["A"]["version"] == "3.0"
    assert doc["slots"]["B"]["boot_state"] == "good"  # the previous release stays a fallback
    assert device.slot_image_sha256("A", images.v3.size) == images.v3.sha256
    assert device.snapshot().slot("B") == b_after_commit


def test_status_text_names_booted_primary_and_versions(device: SimDevice, make_bundle: BundleFactory) -> None:
    device.install_ok(make_bundle("2.0"))
    run = device.agent("status")
    assert run.rc == 0
    lines = run.out.splitlines()
    assert any(line.startswith("booted") and line.split()[1] == "A" for line in lines)
    assert any(line.startswith("primary") and line.split()[1] == "B" for line in lines)
    assert any(line.startswith("slot B") and "2.0" in line and "trial, 3 tries left" in line for line in lines)


def test_status_reports_absolute_slot_paths_resolved_against_the_config_file(device: SimDevice) -> None:
    """Paths in the status document are absolute, resolved against the config file."""
    doc = device.status()
    for name in ("A", "B"):
        assert Path(doc["slots"][name]["path"]).is_absolute()
        assert Path(doc["slots"][name]["path"]).exists()
