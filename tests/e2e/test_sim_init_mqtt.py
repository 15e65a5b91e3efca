"""`ota-agent sim init ... --mqtt URL --device-id ID [--group G ...]` writes an
`[mqtt]` table the agent loads as is (so `ota-agent -c DIR/agent.toml run` and
`ota-fleet` work against the device out of the box), and refuses a setting the
agent would refuse, with one line, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.wiring import build_app, front_ends
from tests.e2e.conftest import Images, KeyPair
from tests.e2e.test_sim_init import sim_init


def test_sim_init_with_a_broker_writes_an_mqtt_table_the_daemon_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: Images, signing_key: KeyPair
) -> None:
    d = tmp_path / "dev"
    run = sim_init(capsys, d, images, signing_key, "--compatible", "board-1", "--mqtt", "mqtt://127.0.0.1:1884",
                   "--device-id", "gw-7", "--group", "lab", "--group", "canary")
    assert run.rc == 0, run.err
    cfg = config.load(d / "agent.toml")
    assert cfg.mqtt is not None
    assert (cfg.mqtt.broker, cfg.mqtt.device_id, cfg.mqtt.groups) == ("mqtt://127.0.0.1:1884", "gw-7",
                                                                      ("lab", "canary"))
    assert cfg.mqtt.reboot_after_install
    assert [f.name for f in front_ends(build_app(d / "agent.toml"))] == ["api", "mqtt"]


def test_sim_init_without_a_broker_has_no_mqtt_front_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: Images, signing_key: KeyPair
) -> None:
    d = tmp_path / "dev"
    assert sim_init(capsys, d, images, signing_key, "--compatible", "board-1").rc == 0
    assert [f.name for f in front_ends(build_app(d / "agent.toml"))] == ["api"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--mqtt", "mqtt://127.0.0.1:1884"], "--mqtt and --device-id go together"),
    (["--device-id", "gw-7"], "--mqtt and --device-id go together"),
    (["--mqtt", "http://127.0.0.1", "--device-id", "gw-7"], "the scheme must be mqtt:// or mqtts://"),
    (["--mqtt", "mqtt://127.0.0.1", "--device-id", "gw/7"], "is not a valid name"),
])
def test_sim_init_refuses_a_broker_setting_the_agent_would_refuse_before_writing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: Images, signing_key: KeyPair, extra: list[str],
    message: str,
) -> None:
    d = tmp_path / "dev"
    line = sim_init(capsys, d, images, signing_key, "--compatible", "board-1", *extra).one_error_line()
    assert message in line
    assert not d.exists()
