"""A damaged or oversized state.json or outbox never locks the device out:
the agent sets the file aside, says so once, keeps the anti-rollback floor
(from its own file), and the next valid install goes through. Foreign text
recorded in the state stays one short line."""

from __future__ import annotations

import json
import logging

from agent.logsetup import CleanFormatter
from agent.state import STATE_BOUND
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, Images

FAKE_LINE = "ota-agent: install: ok"
HUGE_MULTILINE = ("source\n" + FAKE_LINE + "\r\n") * 40_000  # about 1 MB, 80,000 lines


def commit(device: SimDevice, make_bundle: BundleFactory, version: str, security_version: int, image: object) -> None:
    device.install_ok(make_bundle(version, security_version=security_version, image=image))
    device.boot()
    doc = device.status()
    assert doc["last_result"]["event"] == "commit"
    assert doc["committed_security_version"] == security_version


def state_notices(device: SimDevice) -> list[dict[str, object]]:
    return [e for e in device.outbox() if e["event"] == "state"]


def test_an_oversized_state_file_is_set_aside_the_floor_holds_and_installs_go_on(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    commit(device, make_bundle, "2.0", 3, images.v2)
    state_json = device.dir / "state" / "state.json"
    junk = b'{"last_result": {"reason": "' + b"x\\n" * (1 << 20) + b'"}}'  # 2 MiB: past the reader's limit
    state_json.write_bytes(junk)

    doc = device.status()  # used to fail with "agent state is corrupt"
    assert doc["committed_security_version"] == 3  # kept from STATE_DIR/security-floor
    [aside] = (device.dir / "state").glob("state.json.corrupt-*")
    assert aside.read_bytes() == junk
    [notice] = state_notices(device)
    assert notice["result"] == "set-aside"
    assert str(notice["reason"]).startswith("state set aside: larger than 1048576 bytes")
    assert device.status() == doc  # said once
    assert len(state_notices(device)) == 1

    older = make_bundle("2.5", security_version=2, image=images.v3)
    line = device.install(older).one_error_line()
    assert "security version 2 is below the committed security version 3" in line  # anti-rollback still on

    commit(device, make_bundle, "3.0", 4, images.v3)
    assert device.status()["slots"]["A"]["version"] == "3.0"


def test_unparsable_state_and_outbox_are_set_aside_and_a_valid_install_goes_through(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    commit(device, make_bundle, "2.0", 3, images.v2)
    state_dir = device.dir / "state"
    (state_dir / "state.json").write_bytes(b"\x00" * 4096)
    (state_dir / "outbox.log").write_bytes(b"\xff\xfe garbage that is not a record\n" * 40_000)  # ~1.3 MB

    commit(device, make_bundle, "3.0", 4, images.v3)
    assert len(list(state_dir.glob("state.json.corrupt-*"))) == 1
    assert len(list(state_dir.glob("outbox.log.corrupt-*"))) == 1
    events = device.outbox()
    assert events[0]["event"] == "outbox"
    assert "larger than" in events[0]["reason"]
    assert [e["result"] for e in events if e["event"] == "state"] == ["set-aside"]
    assert ("commit", "ok") in [(e["event"], e["result"]) for e in events]
    assert (state_dir / "outbox.log").stat().st_size < 64 * 1024


def test_a_huge_multiline_error_is_recorded_as_one_short_line_and_status_works(device: SimDevice) -> None:
    run = device.install("x://" + HUGE_MULTILINE)
    run.one_error_line()
    assert not [line for line in run.err.splitlines() if line.startswith(FAKE_LINE)]
    state_json = device.dir / "state" / "state.json"
    assert state_json.stat().st_size <= STATE_BOUND
    last = json.loads(state_json.read_text())["last_result"]
    assert (last["event"], last["result"]) == ("install", "failed")
    assert len(last["reason"]) <= 300
    assert "\n" not in last["reason"]
    assert device.status()["last_result"] == last
    assert device.outbox()[-1] == last
    rendered = device.agent("status")
    assert rendered.rc == 0
    assert not [line for line in rendered.out.splitlines() if line.startswith(FAKE_LINE)]


def test_the_cli_log_lines_cannot_be_broken_by_foreign_arguments(device: SimDevice) -> None:
    device.agent("status")  # main() set up logging for this process
    handlers = logging.getLogger().handlers
    assert handlers
    assert all(isinstance(h.formatter, CleanFormatter) for h in handlers)
    device.capsys.readouterr()
    logging.getLogger("agent.sources").warning("redirect to %s", HUGE_MULTILINE)
    err = device.capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("ota-agent: redirect to source\\nota-agent: install: ok\\r\\n")
