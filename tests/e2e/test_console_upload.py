"""A bundle uploaded over the serial console: `ota-console PORT put BUNDLE` on the
host's end of a relay between two pty pairs, the device's console on the other.
The upload streams into the normal install path: the bundle lands in slot B; a
bundle with the wrong digest or an untrusted signature is refused and changes
nothing. A cable pull mid-upload (the relay drops every byte for a while) is
resumed where it stopped, not from the start; a corrupted frame is refused with a
@nak and sent again; frames sent twice and out of order (by a scripted sender)
still give the exact bundle."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.console.cli import main as console_main
from bundler.console.link import DeviceError, DeviceLink
from bundler.console.put import PutStats, put
from ota_common.frames import encode, parse_control
from tests.e2e._console import Pty, Relay, Technician, add_console, served
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, KeyPair


@pytest.fixture
def relay(device: SimDevice) -> Iterator[Relay]:
    relay = Relay()
    add_console(device.config, relay.device.path, device_id="upload-test")
    try:
        with served(device.config):
            yield relay
    finally:
        relay.close()


@pytest.fixture
def tech(device: SimDevice) -> Iterator[Technician]:
    """A scripted sender on the device's console pty, no relay between."""
    pty = Pty.open()
    add_console(device.config, pty.path)
    try:
        with served(device.config):
            tech = Technician(pty.master)
            tech.wait_ready()
            yield tech
    finally:
        pty.close()


def test_put_installs_the_bundle_through_the_normal_install_path(
        device: SimDevice, relay: Relay, make_bundle: BundleFactory, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_bundle("2.0", security_version=2)
    capsys.readouterr()
    rc = console_main([relay.host.path, "put", str(bundle), "--json", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert '"bundle_version": "2.0"' in out
    assert device.status()["slots"]["B"]["version"] == "2.0"


def test_an_untrusted_bundle_is_refused_and_changes_nothing(
        device: SimDevice, relay: Relay, make_bundle: BundleFactory, other_key: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_bundle("3.0", key=other_key)
    before = device.snapshot()
    capsys.readouterr()
    rc = console_main([relay.host.path, "put", str(bundle), "--timeout", "5"])
    _, err = capsys.readouterr()
    assert rc == 1
    assert "none of which is in the keyring" in err
    assert device.snapshot().slot("B") == before.slot("B")
    assert device.snapshot().bootloader == before.bootloader


def test_a_cable_pull_mid_upload_resumes_where_it_stopped(
        device: SimDevice, make_bundle: BundleFactory, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_bundle("2.0", security_version=2)
    size = bundle.stat().st_size
    relay = Relay(rate=3_000_000)  # ~3 MB/s: the cut lands mid-upload
    add_console(device.config, relay.device.path)
    stats = PutStats()
    result: dict[str, object] = {}
    try:
        with served(device.config):
            link = DeviceLink(relay.host.path, timeout=2.0)
            link.open()

            def upload() -> None:
                try:
                    result["reply"] = put(link, bundle, reconnect=60, stats=stats, progress=lambda d, t: None)
                except Exception as e:
                    result["error"] = e

            sender = threading.Thread(target=upload)
            sender.start()
            deadline = time.monotonic() + 60
            while relay.to_device < size // 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            relay.cut()
            time.sleep(3.0)  # longer than the client's timeout: it notices and tries to reconnect
            relay.join()
            sender.join(120)
            link.close()
    finally:
        relay.close()
    assert "error" not in result, result
    assert stats.reconnects >= 1
    assert stats.payload < size + size // 4, (stats, size)  # resumed, not started again
    assert device.status()["slots"]["B"]["version"] == "2.0"


def test_a_corrupted_frame_is_refused_and_sent_again(device: SimDevice, relay: Relay,
                                                     make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0", security_version=2)
    relay.corrupt_at = 100_000  # a byte inside a frame, well after the upload command
    link = DeviceLink(relay.host.path, timeout=5.0)
    link.open()
    stats = PutStats()
    try:
        reply = put(link, bundle, stats=stats, progress=lambda d, t: None)
    finally:
        link.close()
    assert relay.corrupt_at is None  # the bit was flipped
    assert stats.naks >= 1
    assert stats.resent >= 1
    assert reply["ok"] is True
    assert device.status()["slots"]["B"]["version"] == "2.0"


def test_a_wrong_digest_fails_the_install_and_changes_nothing(device: SimDevice, tech: Technician,
                                                              make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0", security_version=2)
    before = device.snapshot()
    data = bundle.read_bytes()
    tech.line("json on")
    tech.reply("json")
    tech.line(f"upload {len(data)} {'0' * 64}")
    tech.reply("upload")
    tech.line("yes")
    doc = tech.reply("upload")
    transfer, frame = doc["result"]["transfer"], doc["result"]["frame"]
    _send_all(tech, data, transfer, frame, shuffle=False)
    done = tech.reply("upload", timeout=60)
    assert done["ok"] is False
    assert done["done"] is True
    assert "SHA-256" in done["error"]["message"]
    after = device.status()
    assert after["primary"] == "A"
    assert after["slots"]["A"]["boot_state"] == "good"
    assert after["slots"]["B"]["bootable"] is False  # marked unbootable before the first byte, and left so
    assert device.snapshot().slot("A") == before.slot("A")


def test_duplicated_and_reordered_frames_still_give_the_exact_bundle(device: SimDevice, tech: Technician,
                                                                      make_bundle: BundleFactory) -> None:
    bundle = make_bundle("2.0", security_version=2)
    data = bundle.read_bytes()
    tech.line("json on")
    tech.reply("json")
    tech.line(f"upload {len(data)} {hashlib.sha256(data).hexdigest()}")
    tech.reply("upload")
    tech.line("yes")
    doc = tech.reply("upload")
    assert doc["pending"] is True
    transfer, frame = doc["result"]["transfer"], doc["result"]["frame"]
    tech.send(encode(transfer + 1, 0, data[:frame]))  # another transfer's frame
    _send_all(tech, data, transfer, frame, shuffle=True)
    done = tech.reply("upload", timeout=60)
    assert done["ok"] is True, done
    assert any(line.startswith(f"@nak {transfer} 0 unknown transfer") for line in tech.seen)
    assert device.status()["slots"]["B"]["version"] == "2.0"


def _send_all(tech: Technician, data: bytes, transfer: int, frame: int, *, shuffle: bool) -> None:
    """A scripted sender: each window granted by an @ack, its frames last-first when
    `shuffle`, and the window's first frame twice."""
    sent_to = 0
    while sent_to < len(data):
        line = tech.read_line()
        c = parse_control(line)
        if c is None or c.kind != "ack" or c.transfer != transfer:
            continue
        offsets = list(range(max(sent_to, c.next), c.limit, frame))
        if not offsets:
            continue
        if shuffle:
            offsets = [offsets[0], *reversed(offsets)]
        for off in offsets:
            tech.send(encode(transfer, off, data[off : off + frame]))
        sent_to = c.limit


def test_put_answers_an_error_with_a_non_zero_exit(device: SimDevice, relay: Relay, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.otab"
    junk.write_bytes(b"not a bundle at all" * 100)
    rc = console_main([relay.host.path, "put", str(junk), "--timeout", "5"])
    assert rc == 1
    assert "ota-console: error:" in capsys.readouterr().err
    link = DeviceLink(relay.host.path, timeout=5.0)
    link.open()
    try:
        with pytest.raises(DeviceError, match=r"mark-bad: .*nosuchslot"):
            link.call("mark-bad nosuchslot")
    finally:
        link.close()


def test_install_from_stdin_is_refused_on_the_console_and_stray_frames_are_noise(tech: Technician) -> None:
    tech.line("install -")
    assert tech.expect(r"^error: install: '-' is the agent's own standard input here")
    for offset in range(0, 40 * 4096, 4096):
        tech.send(encode(1, offset, bytes(4096)))
    seen = tech.quiet(1.0)
    assert 1 <= sum("no upload is running" in line for line in seen) <= 2  # rate-limited, not one per frame
    tech.line("progress")
    assert tech.expect("^no job is running$")


def test_ota_console_cmd_status_json_prints_what_ota_agent_status_json_prints(
        device: SimDevice, relay: Relay, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    rc = console_main([relay.host.path, "--cmd", "status", "--json", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out) == device.status()
    rc = console_main([relay.host.path, "--cmd", "frobnicate", "--json", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert json.loads(err)["error"]["message"].startswith("frobnicate: unknown command 'frobnicate'")
