"""A blank device driven through the real CLI, for the provisioning tests: run
`ota-agent -c factory.toml ...` in-process or as a child process (for SIGKILL at
a named crash point), and take a byte-level picture of everything a run may
write (slots, bootloader storage, state, provisioning directory, device config)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main as agent_main
from agent.crashpoint import ENV as CRASHPOINT_ENV
from agent.daemon import build_device
from tests.e2e._sim import Run
from tests.fixtures.factory import blank_device

REPO = Path(__file__).resolve().parents[2]


def tree(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative path -> SHA-256 and mode)."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.is_symlink():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[p.relative_to(directory).as_posix()] = f"{digest} {p.stat().st_mode:o}"
    return out


class BlankDevice:
    def __init__(self, directory: Path, capsys: pytest.CaptureFixture[str], **spec: Any) -> None:
        self.dir = directory
        self.capsys = capsys
        self.config = blank_device(directory, **spec)

    @property
    def device_config(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def record(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.dir / "provision" / "record.json").read_text())
        return doc

    def run(self, *argv: str) -> Run:
        self.capsys.readouterr()
        rc = agent_main(list(argv))
        out, err = self.capsys.readouterr()
        return Run(rc, out, err)

    def agent(self, *argv: str) -> Run:
        return self.run("-c", str(self.config), *argv)

    def provision(self, bundle: Path, *extra: str) -> Run:
        return self.agent("provision", "--bundle", str(bundle), *extra)

    def provision_ok(self, bundle: Path, *extra: str) -> dict[str, Any]:
        r = self.provision(bundle, "--json", *extra)
        assert r.rc == 0, r.err
        doc: dict[str, Any] = json.loads(r.out)
        return doc

    def provision_killed_at(self, point: str, bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        """`provision` in a child process that SIGKILLs itself at crash point `point`."""
        env = {**os.environ, "PYTHONPATH": str(REPO), CRASHPOINT_ENV: point}
        cmd = [sys.executable, "-m", "agent.cli", "-c", str(self.config), "provision", "--bundle", str(bundle),
               *extra]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)

    def slot_sha256(self, bootname: str, length: int) -> str:
        h = hashlib.sha256()
        with (self.dir / f"slot-{bootname}.img").open("rb") as f:
            h.update(f.read(length))
        return h.hexdigest()

    def boot_state(self) -> Any:
        return build_device(self.config).bootloader.state()

    def tree(self) -> dict[str, str]:
        return tree(self.dir)
