"""Helpers for the end-to-end tests: deterministic images, a handle on one
simulated device directory (run the real `ota-agent` CLI in-process against
it, read its status, outbox and bootloader state), byte-for-byte snapshots,
and a power-on that skips boot-check (a device that hangs or is switched off
before it can commit).

Owns nothing of the agent: every action goes through `agent.cli.main` or, for
the simulated firmware, the shared counting rules in `hw.bootloader.model`.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import sim
from agent.cli import main as agent_main
from hw.bootloader import model
from hw.bootloader.simenv import SimEnv
from ota_common.fsutil import atomic_write

MiB = 1 << 20
COMPATIBLE = "e2e-board-v1"
SLOT_SIZE = 8 * MiB
ERROR_PREFIX = "ota-agent: error:"
RECORD_KEYS = ("seq", "id", "dropped")  # what an outbox record adds to its event


def write_image(path: Path, seed: int, size: int) -> Path:
    """A deterministic image mixing random data, short zero runs inside random
    data and whole zero MiBs (which the bundler turns into ZERO ops)."""
    rng = random.Random(seed)
    out = bytearray()
    for index in range(-(-size // MiB)):
        if index % 3 == 1:
            out += bytes(MiB)
            continue
        mib = bytearray()
        while len(mib) < MiB:
            mib += rng.randbytes(rng.randrange(1, 64 * 1024))
            mib += bytes(rng.randrange(0, 16 * 1024))  # a zero run inside a data MiB
        out += mib[:MiB]
    path.write_bytes(bytes(out[:size]))
    return path


def sha256_file(path: Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    remaining = path.stat().st_size if length is None else length
    with path.open("rb") as f:
        while remaining:
            chunk = f.read(min(remaining, 4 * MiB))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """Hashes of the slot files, the bootloader state file and every file of
    the agent's state directory; the bytes of the small ones too."""

    hashes: dict[str, str]
    small: dict[str, bytes]

    def slot(self, bootname: str) -> str:
        return self.hashes[f"slot-{bootname}.img"]

    @property
    def bootloader(self) -> bytes:
        return self.small["bootloader.json"]

    def boot_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.bootloader)
        return doc

    def agent_state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.small.get("state/state.json", b"{}"))
        return doc


def snapshot(device_dir: Path) -> Snapshot:
    hashes: dict[str, str] = {}
    small: dict[str, bytes] = {}
    paths = [device_dir / "slot-A.img", device_dir / "slot-B.img", device_dir / "bootloader.json"]
    paths += sorted(p for p in (device_dir / "state").rglob("*") if p.is_file())
    for p in paths:
        name = p.relative_to(device_dir).as_posix()
        hashes[name] = sha256_file(p)
        if not name.startswith("slot-"):
            small[name] = p.read_bytes()
    return Snapshot(hashes, small)


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith(ERROR_PREFIX)]

    def one_error_line(self) -> str:
        """The single error line of a failed command; fails on tracebacks or several errors."""
        assert self.rc != 0, f"expected a failure, got rc 0; stdout: {self.out!r}"
        assert "Traceback" not in self.err, self.err
        lines = self.error_lines
        assert len(lines) == 1, f"expected one error line on stderr, got: {self.err!r}"
        return lines[0]


class SimDevice:
    """One simulated device directory, driven through the real CLI."""

    def __init__(self, directory: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.dir = directory
        self.capsys = capsys

    @property
    def config(self) -> Path:
        return sim.config_path(self.dir)

    def slot_path(self, bootname: str) -> Path:
        return self.dir / f"slot-{bootname}.img"

    def run(self, *argv: str) -> Run:
        self.capsys.readouterr()
        rc = agent_main(list(argv))
        out, err = self.capsys.readouterr()
        return Run(rc, out, err)

    def agent(self, *argv: str) -> Run:
        return self.run("-c", str(self.config), *argv)

    def install(self, source: str | Path, *extra: str) -> Run:
        return self.agent("install", str(source), *extra)

    def install_ok(self, source: str | Path) -> Run:
        r = self.install(source)
        assert r.rc == 0, r.err
        return r

    def boot(self, health: str | None = None) -> Run:
        r = self.run("sim", "boot", str(self.dir), *(["--health", health] if health else []))
        assert r.rc == 0, r.err
        return r

    def status(self) -> dict[str, Any]:
        r = self.agent("status", "--json")
        assert r.rc == 0, r.err
        doc: dict[str, Any] = json.loads(r.out)
        return doc

    def outbox_records(self) -> list[dict[str, Any]]:
        """Every record in the outbox file, framing checked here independently of
        the agent's reader: `<crc32 hex> <json>` per line."""
        path = self.dir / "state" / "outbox.log"
        if not path.exists():
            return []
        records = []
        for line in path.read_bytes().splitlines():
            crc, _, body = line.partition(b" ")
            assert int(crc, 16) == zlib.crc32(body), f"outbox line fails its CRC: {line!r}"
            records.append(json.loads(body))
        return records

    def outbox(self) -> list[dict[str, Any]]:
        """The events of the outbox records, oldest first (without seq, id, dropped)."""
        return [{k: v for k, v in r.items() if k not in RECORD_KEYS} for r in self.outbox_records()]

    def snapshot(self) -> Snapshot:
        return snapshot(self.dir)

    def slot_image_sha256(self, bootname: str, length: int) -> str:
        return sha256_file(self.slot_path(bootname), length)

    def power_on_without_boot_check(self) -> model.BootDecision:
        """The simulated firmware's half of a power-on (count, pick, pass the
        slot on the command line) with the device dying before boot-check runs."""
        env = SimEnv(self.dir / sim.ENV_PATHS["sim"], sim.BOOTNAMES)
        state, decision = model.choose(env.load())
        env.store(state)
        atomic_write(self.dir / "cmdline", f"ota.slot={decision.slot} rauc.slot={decision.slot}\n".encode())
        return decision
