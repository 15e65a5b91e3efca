"""USB sticks, end to end: real filesystems (ext4, FAT) on real loop devices,
`ota-agent media /dev/loopN` run as its own process exactly as the udev rule's
unit runs it, on a simulated device. The agent mounts the stick read-only,
picks the newest bundle for this device by the signed manifests (never by file
name), installs it, reports to the outbox and onto the stick, and unmounts;
symlinks on the stick are never followed; a stick that starts failing with EIO
mid-read fails cleanly (booted slot untouched, target unbootable, receipt in
the outbox) and installs from the start when inserted again; through a running
daemon the visit is one of the daemon's jobs. Every test leaves no mount and
no loop device behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.crashpoint import ENV
from bundler.cli import main as ota_bundle
from tests.e2e._api import cli, held_bundle, running, running_job
from tests.e2e._sim import SimDevice
from tests.e2e._stick import (
    assert_nothing_left_mounted,
    ext4_receipts,
    ext4_stick,
    loop_device,
    media,
    media_events,
    needs_loop,
    unmount_all_under,
)
from tests.e2e.conftest import BundleFactory, Images, KeyPair

pytestmark = needs_loop


def tree(root: Path, files: dict[str, Path]) -> Path:
    for name, source in files.items():
        dest = root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    return root


def test_the_newest_compatible_bundle_by_its_signed_manifest_is_installed_and_the_receipt_written_back(
    device: SimDevice, make_bundle: BundleFactory, images: Images, other_key: KeyPair, tmp_path: Path
) -> None:
    v2 = make_bundle("2.0")
    v3 = make_bundle("3.0", image=images.v3)
    files = {
        "edge-ota/v2.otab": v2,
        "edge-ota/sub/update.OTAB": v3,  # found in a subdirectory, whatever the case of its suffix
        "edge-ota/newest-9.9.otab": v2,  # the name lies: the manifest says 2.0
        "other-board.otab": make_bundle("9.0", compatible="other-board"),
        "untrusted.otab": make_bundle("9.1", key=other_key),
    }
    image = ext4_stick(tmp_path / "stick.img", tree(tmp_path / "stick", files))
    with loop_device(image) as dev:
        r = media(device, dev)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "installed version 3.0 into slot B from edge-ota/sub/update.OTAB; " \
        "reboot to try it"
    out = r.stdout
    assert "ignored other-board.otab: for another device: compatible 'other-board', this device is " \
        "'e2e-board-v1'" in out
    assert "ignored untrusted.otab: not a valid bundle for this device:" in out
    # Read in scan order (newest-9.9 first), each 2.0 loses to a newer one, whatever its name.
    assert "ignored edge-ota/newest-9.9.otab: version 2.0 is older than 3.0 (edge-ota/sub/update.OTAB)" in out
    assert "ignored edge-ota/v2.otab: version 2.0 is not newer than 2.0 (edge-ota/newest-9.9.otab)" in out
    status = device.status()
    assert (status["primary"], status["slots"]["B"]["version"]) == ("B", "3.0")
    assert device.slot_image_sha256("B", images.v3.size) == images.v3.sha256
    assert_nothing_left_mounted(device)

    [receipt] = ext4_receipts(image)
    assert (receipt["result"], receipt["old_version"], receipt["new_version"], receipt["slot"]) == \
        ("installed", "factory", "3.0", "B")
    assert receipt["bundle"] == "edge-ota/sub/update.OTAB"
    assert {i["file"] for i in receipt["ignored"]} == {
        "other-board.otab", "untrusted.otab", "edge-ota/newest-9.9.otab", "edge-ota/v2.otab"}
    [queued] = media_events(device)
    assert (queued["result"], queued["bundle_version"], queued["txn"]) == ("installed", "3.0", receipt["txn"])
    assert "usb installed (factory -> 3.0)" in queued["reason"]


def test_symlinks_on_the_stick_are_never_followed(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    # A directory of the device holding a bundle it would install, and links to it
    # and to /dev from the stick: following any of them would install or read it.
    planted = tree(tmp_path / "device-files", {"v2.otab": make_bundle("2.0")})
    root = tmp_path / "stick"
    root.mkdir()
    (root / "edge-ota").symlink_to(planted)
    (root / "v2.otab").symlink_to(planted / "v2.otab")
    (root / "disk.otab").symlink_to("/dev/zero")
    image = ext4_stick(tmp_path / "stick.img", root)
    before = device.snapshot()
    with loop_device(image) as dev:
        r = media(device, dev)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"nothing to install: no bundles on {dev}"
    for name in ("edge-ota", "v2.otab", "disk.otab"):
        assert f"ignored {name}: a symbolic link: not followed" in r.stdout
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B")) == (before.slot("A"), before.slot("B"))
    assert after.bootloader == before.bootloader
    assert_nothing_left_mounted(device)
    # Nor is the receipt written through the link: it goes to the outbox only.
    assert "not written to the stick: writing it failed: a symbolic link or a file is in the way on the " \
        "stick" in r.stdout
    assert sorted(p.name for p in planted.iterdir()) == ["v2.otab"]
    assert [e["result"] for e in media_events(device)] == ["nothing-to-install"]


def test_a_stick_with_nothing_newer_exits_0_saying_nothing_to_install(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    image = ext4_stick(tmp_path / "stick.img", tree(tmp_path / "stick", {
        "edge-ota/v1.otab": make_bundle("1.0"), "edge-ota/v2.otab": make_bundle("2.0")}))
    with loop_device(image) as dev:
        assert media(device, dev).returncode == 0
        device.boot()  # the trial commits: the booted slot runs 2.0
        before = device.snapshot()
        r = media(device, dev)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"nothing to install: no bundle on {dev} is newer than version 2.0 " \
        "for this device"
    assert "ignored edge-ota/v1.otab: version 1.0 is not newer than the installed 2.0" in r.stdout
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B"), after.bootloader) == (before.slot("A"), before.slot("B"),
                                                                   before.bootloader)
    assert [e["result"] for e in media_events(device)] == ["installed", "nothing-to-install"]
    assert_nothing_left_mounted(device)


def test_a_stick_failing_with_eio_mid_read_fails_cleanly_and_installs_when_inserted_again(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle("2.0")
    data = bundle.read_bytes()
    image = ext4_stick(tmp_path / "stick.img", tree(tmp_path / "stick", {"edge-ota/v2.otab": bundle}))
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(image, pristine)
    raw = image.read_bytes()
    at = raw.find(data[:4096])
    assert at > 0
    assert raw[at : at + len(data)] == data  # the bundle lies in one piece on the stick
    cut = (at + len(data) // 2) & ~4095  # in the middle of its payload, far past its signed head
    before = device.snapshot()
    # Read-only like a pulled stick: nothing can be written back.
    with loop_device(image, read_only=True) as dev:
        os.truncate(image, cut)  # from here on the device answers every read with EIO
        r = media(device, dev)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("ota-agent: error: ")
    assert "Input/output error" in r.stderr.splitlines()[-1]
    assert "Traceback" not in r.stderr
    after = device.snapshot()
    assert after.slot("A") == before.slot("A")
    doc = device.status()
    assert (doc["booted"], doc["primary"]) == ("A", "A")
    assert doc["slots"]["B"]["bootable"] is False
    assert after.boot_doc()["slots"]["B"]["state"] == "bad"
    [failed] = media_events(device)
    assert failed["result"] == "failed"
    assert "Input/output error" in failed["reason"]
    assert "read failed after" in failed["reason"]  # mid-payload: the head was read and verified
    assert [e["result"] for e in device.outbox() if e["event"] == "install"][-1] == "failed"
    assert_nothing_left_mounted(device)

    shutil.copyfile(pristine, image)  # the same stick, inserted again
    with loop_device(image) as dev:
        again = media(device, dev)
    assert again.returncode == 0, again.stderr
    assert (device.status()["primary"], device.status()["slots"]["B"]["version"]) == ("B", "2.0")
    assert [e["result"] for e in media_events(device)] == ["failed", "installed"]
    assert_nothing_left_mounted(device)


def test_a_read_only_stick_installs_and_its_receipt_goes_to_the_outbox_only(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    image = ext4_stick(tmp_path / "stick.img", tree(tmp_path / "stick", {"v2.otab": make_bundle("2.0")}))
    with loop_device(image, read_only=True) as dev:
        r = media(device, dev, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["result"], doc["new_version"], doc["receipt_on_stick"]) == ("installed", "2.0", None)
    assert doc["receipt_not_written"].startswith("the stick is read-only")
    assert [e["result"] for e in media_events(device)] == ["installed"]
    assert ext4_receipts(image) == []
    assert_nothing_left_mounted(device)


def test_a_fat_stick_made_by_ota_bundle_usb_prepare_installs(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    image = tmp_path / "stick.img"
    v2, other = make_bundle("2.0"), make_bundle("3.0", compatible="other-board")
    assert ota_bundle(["usb", "prepare", "--image", str(image), "--size", "48M", str(v2), str(other)]) == 0
    with loop_device(image) as dev:
        r = media(device, dev)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("installed version 2.0 into slot B from ")
    assert "for another device: compatible 'other-board'" in r.stdout
    assert device.status()["slots"]["B"]["version"] == "2.0"
    assert_nothing_left_mounted(device)


def test_a_mounted_directory_gets_the_receipt_and_ota_bundle_usb_report_prints_it(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stick = tmp_path / "stick"
    assert ota_bundle(["usb", "prepare", str(stick), str(make_bundle("2.0"))]) == 0
    r = media(device, stick)
    assert r.returncode == 0, r.stderr
    assert "receipt queued for the fleet; written to the stick as edge-ota/reports/" in r.stdout
    [receipt] = list((stick / "edge-ota" / "reports").glob("*.json"))
    assert json.loads(receipt.read_text())["new_version"] == "2.0"
    assert receipt.with_suffix(".txt").read_text().startswith("edge-ota: installed\n")
    capsys.readouterr()
    assert ota_bundle(["usb", "report", str(stick)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.endswith(": installed (factory -> 2.0): installed; slot B will be tried on next boot (3 tries)")


def test_through_a_running_daemon_the_visit_is_the_daemons_job_and_busy_while_another_runs(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    v2 = make_bundle("2.0")
    image = ext4_stick(tmp_path / "stick.img", tree(tmp_path / "stick", {"edge-ota/v2.otab": v2}))
    with running(device) as daemon, loop_device(image) as dev:
        with held_bundle(v2) as server:
            first = cli(device, "install", server.url)
            try:
                job = running_job(daemon.socket)
                busy = media(device, dev)
            finally:
                server.release()
                first.communicate(timeout=60)
        assert busy.returncode == 1
        assert f"busy: job {job['id']} (install) is running" in busy.stderr
        r = media(device, dev, "--json")
        assert r.returncode == 0, r.stderr
        txn = json.loads(r.stdout)["txn"]
        seen = json.loads(device.agent("job", txn, "--json").out)
        log = daemon.log()
    assert (seen["command"], seen["origin"], seen["state"]) == ("media", "cli", "succeeded")
    assert f"mounted {dev} (ext4) read-only" in log
    assert "local API: media requested by uid" in log
    assert_nothing_left_mounted(device)


def test_a_slot_or_an_already_mounted_device_is_refused_as_a_stick_and_nothing_is_mounted(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    before = device.snapshot()
    with loop_device(device.slot_path("A")) as dev:  # the booted slot, seen through another name
        r = media(device, dev)
    assert r.returncode == 1
    assert "is not removable media: it shares storage with slot A" in r.stderr.splitlines()[-1]
    image = ext4_stick(tmp_path / "stick.img", tree(tmp_path / "stick", {"v2.otab": make_bundle("2.0")}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(image) as dev:
        subprocess.run(["mount", "-o", "ro", str(dev), str(mnt)], check=True)
        try:
            mounted = media(device, dev)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    assert mounted.returncode == 1
    assert f"is already mounted at {mnt}; pass that directory instead" in mounted.stderr.splitlines()[-1]
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B"), after.bootloader) == (before.slot("A"), before.slot("B"),
                                                                   before.bootloader)
    assert [e["result"] for e in media_events(device)] == ["failed", "failed"]
    assert_nothing_left_mounted(device)


def test_an_exfat_stick_installs(device: SimDevice, make_bundle: BundleFactory, tmp_path: Path) -> None:
    image = tmp_path / "stick.img"
    with image.open("wb") as f:
        f.truncate(48 << 20)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(image) as dev:
        # The test fills the stick through a read-write exFAT mount of its own.
        subprocess.run(["mount.exfat-fuse", str(dev), str(mnt)], check=True, capture_output=True)
        try:
            (mnt / "edge-ota").mkdir()
            shutil.copyfile(make_bundle("2.0"), mnt / "edge-ota" / "v2.otab")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        r = media(device, dev)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("installed version 2.0 into slot B from edge-ota/v2.otab")
    assert f"mounted {dev} (exfat" in r.stderr
    assert_nothing_left_mounted(device)


def test_an_agent_killed_mid_install_leaves_a_mount_the_next_visit_removes_and_then_installs(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    image = ext4_stick(tmp_path / "stick.img", tree(tmp_path / "stick", {"v2.otab": make_bundle("2.0")}))
    try:
        with loop_device(image) as dev:
            env = {**os.environ, ENV: "mid-payload"}
            cmd = [sys.executable, "-m", "agent.cli", "-c", str(device.config), "media", str(dev)]
            killed = subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False)
            assert killed.returncode == -signal.SIGKILL
            assert str(device.dir / "state" / "media") in Path("/proc/self/mounts").read_text()
            device.boot()  # the power comes back: the interrupted install is told apart by boot-check
            r = media(device, dev)
    finally:
        unmount_all_under(device.dir)
    assert r.returncode == 0, r.stderr
    assert "left by an interrupted visit" in r.stderr
    assert device.status()["slots"]["B"]["version"] == "2.0"
    assert_nothing_left_mounted(device)


def test_a_stick_with_only_broken_or_untrusted_bundles_fails_with_each_reason(
    device: SimDevice, make_bundle: BundleFactory, other_key: KeyPair, tmp_path: Path
) -> None:
    stick = tmp_path / "stick"
    (stick / "edge-ota").mkdir(parents=True)
    (stick / "edge-ota" / "garbage.otab").write_bytes(b"\x89OTAB\r\n\x1a" + bytes(100))
    good = make_bundle("2.0").read_bytes()
    (stick / "edge-ota" / "truncated.otab").write_bytes(good[:200])
    shutil.copyfile(make_bundle("9.0", key=other_key), stick / "edge-ota" / "untrusted.otab")
    before = device.snapshot()
    r = media(device, stick)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == f"ota-agent: error: no installable bundle on {stick}: 3 broken or untrusted"
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B"), after.bootloader) == (before.slot("A"), before.slot("B"),
                                                                   before.bootloader)
    [receipt] = [json.loads(p.read_text()) for p in (stick / "edge-ota" / "reports").glob("*.json")]
    assert receipt["result"] == "failed"
    reasons = {i["file"]: i["reason"] for i in receipt["ignored"]}
    assert sorted(reasons) == ["edge-ota/garbage.otab", "edge-ota/truncated.otab", "edge-ota/untrusted.otab"]
    assert all(r.startswith("not a valid bundle for this device: ") for r in reasons.values())
    assert "truncated" in reasons["edge-ota/truncated.otab"]
    assert [e["result"] for e in media_events(device)] == ["failed"]


def test_an_older_bundle_never_replaces_a_pending_update(
    device: SimDevice, make_bundle: BundleFactory, images: Images, tmp_path: Path
) -> None:
    assert device.install(make_bundle("3.0", image=images.v3)).rc == 0  # pending in slot B, not booted yet
    stick, named = tmp_path / "stick", tmp_path / "v2.5.otab"
    shutil.copyfile(make_bundle("2.5"), named)
    assert ota_bundle(["usb", "prepare", str(stick), str(named)]) == 0
    before = device.snapshot()
    r = media(device, stick)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [
        f"nothing to install: no bundle on {stick} is newer than version factory or the pending 3.0 for this device",
        "ignored edge-ota/v2.5.otab: version 2.5 is not newer than 3.0, pending in slot B",
    ]
    after = device.snapshot()
    assert (after.slot("B"), after.bootloader) == (before.slot("B"), before.bootloader)
