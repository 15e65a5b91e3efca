"""The composition root of the application: builds the `App` (device, rebooter,
job queue), the systemd notifier and the front ends `ota-agent run` hosts, from
one config file.
`agent.daemon.build_device` builds the device's backends; nothing else
constructs either.

The rebooter is the configured `reboot_command`, except on a simulated device
whose reboot command is the simulator's own (`ota-agent sim boot DIR`): there
the daemon performs the simulated power cycle itself, in-process, so a running
`ota-agent run` survives the "reboot" and reports what the boot decided.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from agent import sim
from agent.actions import App, Rebooter, command_rebooter
from agent.daemon import Device, build_device
from hw.sdnotify import SdNotify

if TYPE_CHECKING:
    from agent.service import FrontEnd

log = logging.getLogger(__name__)


def sim_directory(device: Device) -> Path | None:
    """The simulated device directory when the reboot command is the simulator's."""
    cmd = device.config.reboot_command
    if len(cmd) == 4 and Path(cmd[0]).name == "ota-agent" and cmd[1:3] == ("sim", "boot"):
        return Path(cmd[3])
    return None


def rebooter_for(device: Device) -> Rebooter:
    directory = sim_directory(device)
    if directory is None:
        return command_rebooter(device)

    def simulated_power_cycle() -> None:
        log.info("simulated reboot of %s", directory)
        sim.power_on(directory, say=lambda line: log.info("%s", line))

    return simulated_power_cycle


def build_app(config_path: Path) -> App:
    device = build_device(config_path)
    return App(device, rebooter=rebooter_for(device))


def notifier() -> SdNotify:
    """systemd's notification socket (NOTIFY_SOCKET; a no-op outside systemd)."""
    return SdNotify()


def front_ends(app: App) -> list[FrontEnd]:
    """The front ends the config enables (the local API, MQTT, the serial console ports, ...).
    Imported here: a command run from the CLI (an install's start-up) needs none of them."""
    from agent import api_server  # noqa: PLC0415
    from agent.console.port import ConsolePort  # noqa: PLC0415
    from agent.mqtt.frontend import MqttFrontEnd  # noqa: PLC0415

    fronts: list[FrontEnd] = [*api_server.front_ends(app.device.config.api)]
    mqtt = app.device.config.mqtt
    if mqtt is not None:
        fronts.append(MqttFrontEnd(mqtt, reboot_in_process=sim_directory(app.device) is not None))
    console = app.device.config.console
    fronts += [ConsolePort(console, port) for port in console.ports]
    return fronts
