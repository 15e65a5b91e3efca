"""`ota-agent run`: the long-running service behind ota-agent.service.

Owns the service lifecycle systemd expects of a Type=notify unit: READY=1 once
the device's config, bootloader and state are readable, a STATUS= line that
says what the device runs, WATCHDOG=1 at half the WatchdogSec= interval (so a
hung agent is killed and restarted), and a clean stop on SIGTERM/SIGINT.
Transports that receive bundles (MQTT, USB, serial console) attach to this
loop; it does not install anything by itself.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from agent.daemon import Device
from agent.status import status
from hw.sdnotify import SdNotify

log = logging.getLogger(__name__)

IDLE_TICK = 30.0


def run(device: Device, notify: SdNotify | None = None, stop: threading.Event | None = None) -> int:
    notify = notify or SdNotify()
    stop = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, stopping", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    booted = device.bootloader.booted_slot()  # fails loudly now rather than after READY
    doc = status(device)
    line = f"booted {booted}, version {doc['slots'][booted]['version'] or 'unknown'}; idle"
    notify.ready(line)
    log.info("agent running: %s", line)
    interval = notify.watchdog_interval() or IDLE_TICK
    while not stop.wait(min(interval, IDLE_TICK)):
        notify.watchdog()
    notify.stopping("stopping")
    return 0
