"""The update cycle on the virtual device, step by step, shared by the test
(`make vm-test`, tests/vm/test_vm_update_cycle.py) and `make vm-demo`.

The test images are the v1 root file system with a file or two changed by
`debugfs -w` (no mount): /etc/edge-ota-vm/version, /etc/edge-ota-vm/health
(ok | fail | block | lockup, read by the guest's health check
/usr/local/sbin/vm-health and by vm-block.service, which boot-check waits for),
and /etc/edge-ota/agent.toml when the image changes the agent's config.
Their bundles are signed with the VM's key and served over HTTP from the host
(10.0.2.2 in the guest). Every step records a timeline entry.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vm.build import COMPATIBLE, GUEST, Image
from tests.vm.machine import GuestError, Machine, kvm_usable
from tests.vm.paths import IMAGE, TOP, exclusive

BOOT_TIMEOUT = 900.0  # TCG on a busy 2-core host


def selected_steps() -> list[str]:
    """VM_STEPS (e.g. "1,2", "usb,mqtt" or "all"). Default: the update cycle
    (steps 1 to 5) with KVM; under TCG (a boot takes a minute or more) step 1
    only, so `make test` stays within its 15 minutes on 2 cores. The transports (6 usb, 7 mqtt, 8
    serial) run only when named; `make vm-test` sets VM_STEPS=all."""
    default = "1,2,3,4,5" if kvm_usable() else "1"
    chosen = os.environ.get("VM_STEPS", default).replace("all", "1,2,3,4,5,6,7,8")
    return [TRANSPORT_STEPS.get(s.strip(), s.strip()) for s in chosen.split(",")]


# The transports (tests/vm/test_vm_transports.py): only when named, or "all".
TRANSPORT_STEPS = {"usb": "6", "mqtt": "7", "serial": "8"}


@dataclass(frozen=True)
class Variant:
    version: str
    security_version: int
    health: str  # ok | fail | block | lockup
    config: str = ""  # appended to the guest's /etc/edge-ota/agent.toml in this image
    trial_deadline: int = 0  # this image's [watchdog] trial_deadline (0: the guest's)

    def agent_toml(self) -> str | None:
        """This image's agent.toml when it differs from the guest's."""
        if not self.config and not self.trial_deadline:
            return None
        toml = (GUEST / "agent.toml").read_text()
        if self.trial_deadline:
            toml = re.sub(r"(?m)^trial_deadline = \d+$", f"trial_deadline = {self.trial_deadline}", toml)
        return toml + self.config

    @property
    def filename(self) -> str:
        toml = self.agent_toml()
        if toml is None:
            return f"vm-{self.version}.otab"
        return f"vm-{self.version}-{hashlib.sha256(toml.encode()).hexdigest()[:8]}.otab"


V2 = Variant("2.0.0", 2, "ok")
V3 = Variant("3.0.0", 3, "fail")
# v4's boot blocks before its health check (vm-block.service never finishes);
# its short trial deadline keeps each of its three tries near 2 minutes under TCG.
V4 = Variant("4.0.0", 4, "block", trial_deadline=90)


def powercut_variant(n: int) -> Variant:
    return Variant(f"5.0.{n}", 5, "ok")


def _debugfs_write(image: Path, path: str, text: str, work: Path) -> None:
    src = work / "debugfs-src"
    src.write_text(text)
    cmds = f"rm {path}\nwrite {src} {path}\nsif {path} mode 0100644\n"
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=cmds, text=True, check=True, capture_output=True)


def bundle(image: Image, v: Variant) -> Path:
    """The signed bundle of `v` (cached beside the image; another worker building it is waited for)."""
    out = Path(image.directory) / "bundles" / v.filename
    with exclusive(IMAGE):
        if not out.exists():
            _build_bundle(image, v, out)
    return out


def _build_bundle(image: Image, v: Variant, out: Path) -> None:
    out.parent.mkdir(exist_ok=True)
    work = out.parent / f"work-{v.filename}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        rootfs = work / "rootfs.ext4"
        subprocess.run(["cp", "--sparse=always", str(image.rootfs), str(rootfs)], check=True)
        _debugfs_write(rootfs, "/etc/edge-ota-vm/version", v.version + "\n", work)
        _debugfs_write(rootfs, "/etc/edge-ota-vm/health", v.health + "\n", work)
        toml = v.agent_toml()
        if toml is not None:
            _debugfs_write(rootfs, "/etc/edge-ota/agent.toml", toml, work)
        key = Path(image.directory).parent / "keys" / "signing.key"
        tmp = work / "b.otab"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bundler.cli",
                "create",
                "--image",
                str(rootfs),
                "--key",
                str(key),
                "--version",
                v.version,
                "--security-version",
                str(v.security_version),
                "--compatible",
                COMPATIBLE,
                "--level",
                "3",
                "-o",
                str(tmp),
            ],
            check=True,
            capture_output=True,
            cwd=TOP,
        )
        tmp.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def http_server(directory: Path) -> Iterator[int]:
    """Serves `directory` on 127.0.0.1 (10.0.2.2 in the guest); yields the port."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a power cut resets the guest's connection mid-bundle: expected

    handler = functools.partial(Quiet, directory=str(directory))
    srv = Server(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


@dataclass
class Timeline:
    t0: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, float, str]] = field(default_factory=list)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.rows.append((start - self.t0, time.monotonic() - start, what))

    def render(self) -> str:
        lines = ["  at (s)  took (s)  step"]
        lines += [f"{at:8.1f}  {took:8.1f}  {what}" for at, took, what in self.rows]
        return "\n".join(lines)


class Device:
    """The virtual device under test: its machine, bundle server and timeline."""

    def __init__(self, machine: Machine, image: Image, port: int, timeline: Timeline, say: Any = None) -> None:
        self.m = machine
        self.image = image
        self.port = port
        self.timeline = timeline
        self.say = say or (lambda _msg: None)
        self.install_seconds = 30.0  # measured by the first install

    def boot(self, slot: str, how: str = "", what: str = "") -> str:
        """Waits until GRUB boots `slot` (its reason matching `how`) and the shell is up."""
        with self.timeline.step(what or f"boot slot {slot}"):
            m = self.m.wait_for(r"ota: booting slot (\w+) \(([^)]*)\)", BOOT_TIMEOUT)
            if m.group(1) != slot or how not in m.group(2):
                raise GuestError(f"GRUB booted slot {m.group(1)} ({m.group(2)}), expected {slot} ({how})")
            self.say(f"GRUB: booting slot {m.group(1)} ({m.group(2)})")
            self.m.wait_shell(BOOT_TIMEOUT)
        return m.group(2)

    def wait_assessed(self) -> str:
        """Waits for ota-boot-check.service to finish; returns its state."""
        with self.timeline.step("boot-check"):
            _, out = self.m.sh(
                "while :; do s=$(systemctl show -P ActiveState ota-boot-check.service); "
                'case $s in active|failed) break;; esac; sleep 1; done; echo "$s"',
                timeout=BOOT_TIMEOUT,
            )
        return out.strip().splitlines()[-1] if out.strip() else ""

    def status(self) -> dict[str, Any]:
        _, out = self.m.sh("ota-agent status --json", timeout=120)
        doc: dict[str, Any] = json.loads(out[out.index("{") : out.rindex("}") + 1])
        return doc

    def grubenv(self) -> dict[str, str]:
        _, out = self.m.sh("grub-editenv /boot/grub/grubenv list", timeout=60)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def install(self, v: Variant) -> None:
        start = time.monotonic()
        with self.timeline.step(f"install {v.version} over HTTP"):
            self.m.sh(f"ota-agent install http://10.0.2.2:{self.port}/{v.filename}", timeout=BOOT_TIMEOUT)
        self.install_seconds = time.monotonic() - start
        self.say(f"installed {v.version}")

    def reboot(self) -> None:
        self.m.send("ota-agent reboot\n")

    def write_file(self, path: str, text: str, mode: str = "0644") -> None:
        """Writes `text` to `path` in the guest (base64 over the console, in lines a tty takes)."""
        data = base64.b64encode(text.encode()).decode()
        self.m.sh(f"mkdir -p $(dirname {path}) && : > {path}.b64")
        for i in range(0, len(data), 1024):
            self.m.sh(f"printf %s {data[i : i + 1024]} >> {path}.b64")
        self.m.sh(f"base64 -d {path}.b64 > {path} && rm {path}.b64 && chmod {mode} {path}")

    def add_config(self, text: str) -> None:
        """Appends `text` to the running slot's agent.toml and restarts the daemon with it."""
        self.write_file("/tmp/agent-extra.toml", "\n" + text)
        self.m.sh("cat /tmp/agent-extra.toml >> /etc/edge-ota/agent.toml")
        self.m.sh("systemctl restart ota-agent.service && systemctl is-active ota-agent.service", timeout=300)

    def boot_until_hang(self, n: int, slot: str, v: Variant) -> None:
        """One trial boot of `v` in `slot` that hangs: a blocked unit (the early
        trial watchdog gives up at the deadline) or a kernel lockup."""
        with self.timeline.step(f"try {n + 1}: v{v.version} in {slot} hangs ({v.health}), i6300esb resets"):
            m = self.m.wait_for(r"ota: booting slot (\w+) \(([^)]*)\)", BOOT_TIMEOUT)
            if m.group(1) != slot or "trial" not in m.group(2):
                raise GuestError(f"GRUB booted slot {m.group(1)} ({m.group(2)}), expected a trial of {slot}")
            self.say(f"GRUB: booting slot {slot} ({m.group(2)})")
            if v.health == "block":
                self.m.wait_for(r"vm-health: blocking the boot", BOOT_TIMEOUT)
                self.say("a unit boot-check waits for blocks; the trial watchdog feeds the i6300esb until its deadline")
                self.m.wait_for(r"did not reach boot-check within \d+ s", BOOT_TIMEOUT)
                self.say("trial deadline passed: the watchdog is no longer fed")
            else:
                self.m.wait_for(r"vm-health: locking up the kernel|Kernel panic|sysrq: Trigger a crash", BOOT_TIMEOUT)
                self.say("the kernel locked up; waiting for the watchdog")


def good_slot_booted(status: dict[str, Any]) -> bool:
    booted = status["booted"]
    return booted is not None and status["slots"][booted]["boot_state"] == "good"


def first_boot(d: Device) -> dict[str, Any]:
    d.boot("A", "committed", "boot v1 from A")
    d.wait_assessed()
    st = d.status()
    env = d.grubenv()
    return {"status": st, "env": env}


def update_commits(d: Device) -> dict[str, Any]:
    d.install(V2)
    d.reboot()
    d.boot("B", "trial", "reboot: GRUB tries v2 in B")
    state = d.wait_assessed()
    return {"boot_check": state, "status": d.status(), "env": d.grubenv()}


def failing_health_rolls_back(d: Device) -> dict[str, Any]:
    d.install(V3)
    d.reboot()
    d.boot("A", "trial", "reboot: GRUB tries v3 in A")
    # boot-check fails the health check, marks A bad and reboots by itself.
    d.boot("B", "committed", "health check failed: back to B")
    d.wait_assessed()
    return {"status": d.status(), "env": d.grubenv()}


def hang_resets_and_falls_back(d: Device, tries: int = 3, v: Variant = V4) -> dict[str, Any]:
    """`v` hangs in every trial boot: after `tries` resets GRUB boots the running slot again."""
    booted = d.status()["booted"]
    other = "A" if booted == "B" else "B"
    d.install(v)
    d.reboot()
    for n in range(tries):
        d.boot_until_hang(n, other, v)
    d.boot(booted, "", f"tries used up: GRUB falls back to {booted}")
    d.wait_assessed()
    return {"status": d.status(), "env": d.grubenv(), "booted_before": booted, "tried": other}


def power_cuts(d: Device, cuts: int, rng: random.Random, start_slot: str) -> list[dict[str, Any]]:
    """Cuts the power at a random moment of an install, `cuts` times; after each
    the device boots a good slot: the running one, or, when the cut came after the
    install had finished (the new slot verified and set to be tried), a trial of
    the new one that boot-check commits. Returns the status after every boot."""
    seen = []
    slot = start_slot
    for n in range(cuts):
        v = powercut_variant(n)
        delay = rng.uniform(0.0, d.install_seconds)
        with d.timeline.step(f"power cut {n + 1}/{cuts} {delay:.1f} s into installing {v.version}"):
            d.m.send(f"ota-agent install http://10.0.2.2:{d.port}/{v.filename}\n")
            time.sleep(delay)
            d.m.power_cut()
            d.m.start()
        with d.timeline.step(f"boot after power cut {n + 1}"):
            m = d.m.wait_for(r"ota: booting slot (\w+) \(([^)]*)\)", BOOT_TIMEOUT)
            booted, how = m.group(1), m.group(2)
            if booted != slot and "trial" not in how:
                raise GuestError(f"after power cut {n + 1} GRUB booted slot {booted} ({how}), expected {slot}")
            if "no bootable slot" in how:  # GRUB could not read grubenv ("invalid environment block")
                raise GuestError(f"after power cut {n + 1} GRUB found no bootable slot: {how}")
            d.say(f"GRUB: booting slot {booted} ({how})")
            d.m.wait_shell(BOOT_TIMEOUT)
        d.wait_assessed()
        st = d.status()
        if not good_slot_booted(st):
            raise GuestError(f"after power cut {n + 1} the booted slot is not good: {st}")
        if st["booted"] != slot:  # the install had finished: its slot was tried and committed
            if st["slots"][st["booted"]]["version"] != v.version:
                raise GuestError(f"after power cut {n + 1} slot {st['booted']} runs, not {v.version}: {st}")
            slot = st["booted"]
        seen.append(st)
    return seen
