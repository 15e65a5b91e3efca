"""Challenge-response on the console when technician keys are configured: a
state-changing command runs only after the device's challenge (device-specific,
bound to the command, single use, short expiry) is signed by a technician key.
A wrong key, a challenge rewritten for another device, a replayed response and an
expired one are refused and change nothing; every failure is an outbox event;
after `max_failures` the console locks. `ota-console --key` answers by itself."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.console.cli import main as console_main
from bundler.format.signing import generate_key, load_private_key
from tests.e2e._console import Pty, Relay, Technician, add_console, served
from tests.e2e._sim import SimDevice, Snapshot

DEVICE_ID = "gw-0042"


@dataclass
class Keys:
    tech: Ed25519PrivateKey
    tech_path: Path
    stranger: Ed25519PrivateKey


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    tech_dir = tmp_path / "technicians"
    _tech_key, _ = generate_key(tech_dir)
    stranger_key, _ = generate_key(tmp_path / "stranger")
    (tech_dir / "signing.key").rename(tmp_path / "tech.key")  # the device's directory holds only .pub files
    return Keys(load_private_key(tmp_path / "tech.key"), tmp_path / "tech.key", load_private_key(stranger_key))


@pytest.fixture
def tech(device: SimDevice, keys: Keys, tmp_path: Path) -> Iterator[Technician]:
    pty = Pty.open()
    add_console(device.config, pty.path, technician_keys=str(tmp_path / "technicians"), device_id=DEVICE_ID,
                challenge_ttl=1.0, max_failures=3, lockout=30.0)
    try:
        with served(device.config):
            tech = Technician(pty.master)
            tech.wait_ready()
            tech.line("json on")
            tech.reply("json")
            yield tech
    finally:
        pty.close()


def _challenge(tech: Technician, command: str) -> dict[str, str]:
    tech.line(command)
    doc = tech.reply(command.split(maxsplit=1)[0])
    assert doc["ok"] is True, doc
    ask = doc["confirm"]
    assert ask["challenge"].startswith("edge-ota console challenge v1 ")
    assert f"device={DEVICE_ID} " in ask["challenge"]
    assert ask["challenge"].endswith(f"command={command}")
    return dict(ask)


def _sign(key: Ed25519PrivateKey, text: str) -> str:
    return base64.b64encode(key.sign(text.encode())).decode()


def _unchanged(device: SimDevice, before: Snapshot) -> None:
    """Slots, bootloader and state as they were (the outbox gains the failure reports)."""
    after = device.snapshot()
    assert {k: v for k, v in after.hashes.items() if "outbox" not in k} == \
        {k: v for k, v in before.hashes.items() if "outbox" not in k}


def _auth_events(device: SimDevice) -> list[dict[str, object]]:
    return [r for r in device.outbox() if r["event"] == "console-auth"]


def test_a_signed_challenge_runs_the_command(device: SimDevice, tech: Technician, keys: Keys) -> None:
    ask = _challenge(tech, "mark-good")
    tech.line(f"response {ask['nonce']} {_sign(keys.tech, ask['challenge'])}")
    doc = tech.reply("mark-good")
    assert doc["pending"] is True
    done = tech.reply("mark-good")
    assert done["ok"] is True
    assert done["done"] is True
    assert _auth_events(device) == []


def test_wrong_key_other_device_replay_and_expiry_are_refused_and_recorded(
        device: SimDevice, tech: Technician, keys: Keys) -> None:
    before = device.snapshot()
    # A key that is no technician's.
    ask = _challenge(tech, "reboot")
    tech.line(f"response {ask['nonce']} {_sign(keys.stranger, ask['challenge'])}")
    assert "not signed by a technician key" in tech.reply("response")["error"]["message"]
    # The technician's key over the challenge rewritten for another device.
    ask = _challenge(tech, "reboot")
    elsewhere = ask["challenge"].replace(f"device={DEVICE_ID}", "device=gw-0001")
    tech.line(f"response {ask['nonce']} {_sign(keys.tech, elsewhere)}")
    assert "not signed by a technician key" in tech.reply("response")["error"]["message"]
    _unchanged(device, before)
    events = _auth_events(device)
    assert len(events) == 2
    assert all(e["result"] == "failed" for e in events)


def test_a_replayed_response_is_refused(device: SimDevice, tech: Technician, keys: Keys) -> None:
    ask = _challenge(tech, "mark-good")
    response = f"response {ask['nonce']} {_sign(keys.tech, ask['challenge'])}"
    tech.line(response)
    tech.reply("mark-good")
    assert tech.reply("mark-good")["ok"] is True  # the job's result
    tech.line(response)  # the same answer again
    refused = tech.reply("response")
    assert refused["ok"] is False
    assert "unknown or already used challenge" in refused["error"]["message"]
    assert "replayed" in _auth_events(device)[-1]["reason"]


def test_an_expired_response_is_refused(device: SimDevice, tech: Technician, keys: Keys) -> None:
    before = device.snapshot()
    ask = _challenge(tech, "reboot")
    time.sleep(2.1)  # challenge_ttl is 1 s (expiry has one-second resolution)
    tech.line(f"response {ask['nonce']} {_sign(keys.tech, ask['challenge'])}")
    refused = tech.reply("response")
    assert "expired" in refused["error"]["message"]
    _unchanged(device, before)


def test_repeated_failures_lock_the_console(device: SimDevice, tech: Technician, keys: Keys) -> None:
    for _ in range(3):
        ask = _challenge(tech, "reboot")
        tech.line(f"response {ask['nonce']} {'A' * 88}")
        last = tech.reply("response")
    assert "locked for 30 s" in last["error"]["message"]
    tech.line("reboot")
    locked = tech.reply("reboot")
    assert locked["ok"] is False
    assert locked["error"]["message"].startswith("locked: too many failed challenge responses")
    events = _auth_events(device)
    assert len(events) == 4  # three failures and the lockout; attempts while locked are not each recorded
    assert "locked for 30 s" in events[-1]["reason"]
    tech.line("status")  # read-only commands still work
    assert tech.reply("status")["ok"] is True


def test_ota_console_key_answers_the_challenge(device: SimDevice, keys: Keys, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    relay = Relay()
    add_console(device.config, relay.device.path, technician_keys=str(tmp_path / "technicians"), device_id=DEVICE_ID)
    try:
        with served(device.config):
            capsys.readouterr()
            rc = console_main([relay.host.path, "--cmd", "mark-good", "--json", "--key", str(keys.tech_path)])
            out, err = capsys.readouterr()
            assert rc == 0, out + err
            assert json.loads(out)["verdict"] == "good"
            rc = console_main([relay.host.path, "--cmd", "mark-good"])
            err = capsys.readouterr().err
            assert rc == 1
            assert "give --key TECH.key" in err
    finally:
        relay.close()
