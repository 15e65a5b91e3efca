"""The installer merges the device's /etc into the new slot before the switch
(`[etc] merge = true`): the sim device's slots hold ext4 images with /etc
(mounted on loop devices by the agent), the device's live /etc is a directory.
A clean merge installs and says so in the result; a conflict fails the install
before the switch (the booted slot stays primary) and is listed in the error,
the result and the status: in the reason text and as a structured `conflicts`
list (path, kind, outcome) in `install --json`, `status --json`, state.json and
the outbox."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent import sim
from bundler.build import BundleSpec, build_full
from tests.e2e._sim import COMPATIBLE, SimDevice
from tests.e2e.conftest import KeyPair
from tests.oci._trees import mounted

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the agent mounts the ext4 slot")

ETC = {"hostname": "default", "ssh/sshd_config": "Port 22", "app.d/a.conf": "a=1"}


def etc_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def ext4_image(root: Path, out: Path, etc: dict[str, str]) -> Path:
    """A small rootfs image: /etc and its factory copy /usr/share/factory/etc."""
    etc_tree(root / "etc", etc)
    etc_tree(root / "usr/share/factory/etc", etc)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(out), "8M"], check=True, env=env)
    return out


def device_with_etc(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: KeyPair, **etc_opts: str) -> SimDevice:
    factory = ext4_image(tmp_path / "v1", tmp_path / "v1.ext4", ETC)
    directory = tmp_path / "device"
    sim.init(sim.SimSpec(directory, factory, key.public, COMPATIBLE, slot_size=16 << 20))
    live = etc_tree(directory / "live-etc", ETC)
    (live / "hostname").write_text("device-17")  # the device's own configuration
    (live / "ssh/host_key").write_text("device key")
    defaults = etc_tree(directory / "factory-etc", ETC)  # the booted image's pristine /etc
    extra = "".join(f'{k} = "{v}"\n' for k, v in etc_opts.items())
    with sim.config_path(directory).open("a") as f:
        f.write(f'\n[etc]\nmerge = true\nold = "{defaults}"\ncurrent = "{live}"\n{extra}')
    return SimDevice(directory, capsys)


def bundle(tmp_path: Path, key: KeyPair, etc: dict[str, str]) -> Path:
    image = ext4_image(tmp_path / "v2", tmp_path / "v2.ext4", etc)
    out = tmp_path / "v2.otab"
    spec = BundleSpec(image=image, key=key.private, version="2.0", security_version=1, compatible=COMPATIBLE)
    build_full(spec, out)
    return out


def test_the_new_slot_gets_the_devices_etc_merged_with_the_new_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair
) -> None:
    device = device_with_etc(tmp_path, capsys, signing_key)
    new = ETC | {"app.d/b.conf": "b=2", "ssh/sshd_config": "Port 22\nPermitRootLogin no"}
    device.install_ok(bundle(tmp_path, signing_key, new))
    status = device.status()
    assert (status["last_result"]["result"], status["primary"]) == ("ok", "B")
    assert "/etc merged: " in status["last_result"]["reason"]
    assert "conflicts" not in status["last_result"]  # a clean merge: no key at all, as before
    with mounted(device.slot_path("B"), tmp_path / "mnt", "ext4") as root:
        assert (root / "etc/hostname").read_text() == "device-17"
        assert (root / "etc/ssh/host_key").read_text() == "device key"
        assert (root / "etc/app.d/b.conf").read_text() == "b=2"
        assert (root / "etc/ssh/sshd_config").read_text() == "Port 22\nPermitRootLogin no"
        assert (root / "usr/share/factory/etc/hostname").read_text() == "default"  # next update's old side
        assert not [p for p in root.iterdir() if p.name.startswith(".etc-merge-")]


def test_a_conflict_fails_the_install_before_the_switch_and_is_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair
) -> None:
    device = device_with_etc(tmp_path, capsys, signing_key)
    before = device.snapshot()
    line = device.install(bundle(tmp_path, signing_key, ETC | {"hostname": "image-name"})).one_error_line()
    assert "/etc merge: 1 conflicts: hostname (changed on the device and in the new image)" in line
    last = device.status()["last_result"]
    assert last["result"] == "failed"
    assert "hostname (changed on the device and in the new image)" in last["reason"]
    status = device.status()
    assert (status["booted"], status["primary"], status["trial"]) == ("A", "A", None)  # no switch
    assert device.snapshot().slot("A") == before.slot("A")
    expected = [{"path": "hostname", "kind": "both-changed", "outcome": "failed",
                 "detail": "changed on the device and in the new image"}]
    assert last["conflicts"] == expected
    assert device.snapshot().agent_state()["last_result"]["conflicts"] == expected
    failed = [e for e in device.outbox() if (e["event"], e["result"]) == ("install", "failed")]
    assert [e["conflicts"] for e in failed] == [expected]


def test_several_conflicts_are_listed_each_with_its_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair
) -> None:
    device = device_with_etc(tmp_path, capsys, signing_key)
    (device.dir / "live-etc/app.d/a.conf").unlink()  # deleted on the device
    new = {"hostname": "image-name", "ssh": "a file now", "app.d/a.conf": "a=2"}
    assert device.install(bundle(tmp_path, signing_key, new)).rc != 0
    conflicts = {c["path"]: (c["kind"], c["outcome"]) for c in device.status()["last_result"]["conflicts"]}
    assert conflicts == {
        "hostname": ("both-changed", "failed"),
        "ssh": ("type-changed", "failed"),  # a directory holding the device's host_key, a file in the image
        "app.d/a.conf": ("deleted-locally", "failed"),
    }


def test_on_conflict_keep_local_installs_and_reports_the_conflict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair
) -> None:
    device = device_with_etc(tmp_path, capsys, signing_key, on_conflict="keep-local")
    result = json.loads(device.install(bundle(tmp_path, signing_key, ETC | {"hostname": "image-name"}), "--json").out)
    expected = [{"path": "hostname", "kind": "both-changed", "outcome": "kept-local",
                 "detail": "changed on the device and in the new image"}]
    assert result["conflicts"] == expected
    last = device.status()["last_result"]
    assert "1 conflicts resolved by policy: hostname" in last["reason"]
    assert last["conflicts"] == expected
    installed = [e for e in device.outbox() if (e["event"], e["result"]) == ("install", "ok")]
    assert [e["conflicts"] for e in installed] == [expected]
    with mounted(device.slot_path("B"), tmp_path / "mnt", "ext4") as root:
        assert (root / "etc/hostname").read_text() == "device-17"
    assert device.boot().rc == 0
    committed = device.status()["last_result"]
    assert (committed["event"], committed["result"], committed["slot"]) == ("commit", "ok", "B")
    assert committed["conflicts"] == expected  # still shown once the update they belong to runs


def test_an_erofs_image_refuses_the_merge_at_install_time_and_points_at_the_overlay_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair
) -> None:
    device = device_with_etc(tmp_path, capsys, signing_key)
    root = tmp_path / "v2-erofs"
    etc_tree(root / "etc", ETC)
    etc_tree(root / "usr/share/factory/etc", ETC)
    image = tmp_path / "v2.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(root)], check=True)
    out = tmp_path / "v2-erofs.otab"
    build_full(BundleSpec(image=image, key=signing_key.private, version="2.0", security_version=1,
                          compatible=COMPATIBLE), out)
    before = device.snapshot()
    line = device.install(out).one_error_line()
    assert f"/etc merge: slot {device.slot_path('B')} holds a read-only erofs image" in line
    assert "keep /etc on a data or overlay partition instead (docs/containers.md)" in line
    status = device.status()
    assert (status["primary"], status["trial"], status["slots"]["B"]["bootable"]) == ("A", None, False)
    assert device.snapshot().slot("A") == before.slot("A")
    assert status["last_result"]["result"] == "failed"
