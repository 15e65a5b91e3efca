"""systemd's own `bootctl`, used to cross-check BLS entries the way systemd reads them.

Debian's `systemd-boot` package cannot be installed beside the running systemd
in a container (its postinst wants an ESP), so this fetches the .deb with
`apt-get download` once, unpacks it under ~/.cache/edge-ota/systemd-boot/ and
runs `bootctl list` on a plain directory: in a private mount namespace
(`unshare -m`) the directory is bind-mounted onto itself, because bootctl insists
the ESP is a mount point, and SYSTEMD_RELAX_ESP_CHECKS=1 lets it be non-FAT.

Run `python -m tests.component._bootctl` to prefetch (make test does it lazily).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-ota" / "systemd-boot"


def _usable(binary: Path) -> bool:
    try:
        return subprocess.run([binary, "--version"], check=False, capture_output=True, timeout=10).returncode == 0
    except OSError:
        return False


def fetch() -> tuple[Path | None, str]:
    """(path to bootctl, "") or (None, why it is not available)."""
    binary = CACHE / "usr" / "bin" / "bootctl"
    if binary.exists() and _usable(binary):
        return binary, ""
    for tool in ("apt-get", "dpkg-deb", "unshare"):
        if shutil.which(tool) is None:
            return None, f"{tool} not found"
    if os.geteuid() != 0:
        return None, "bootctl needs a bind mount: run as root"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", "-qq", "systemd-boot"]
        r = subprocess.run(cmd, check=False, cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
            r = subprocess.run(cmd, check=False, cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("systemd-boot_*.deb"))
        if r.returncode != 0 or not debs:
            return None, f"apt-get download systemd-boot failed: {r.stderr.strip()[-200:]}"
        shutil.rmtree(CACHE, ignore_errors=True)
        CACHE.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(CACHE)], check=True)
    if not _usable(binary):
        return None, f"{binary} from the systemd-boot package does not run on this systemd"
    return binary, ""


@dataclass(frozen=True)
class ListedEntry:
    id: str
    source: str
    default: bool
    tries_left: int | None
    tries_done: int | None


def list_entries(bootctl: Path, esp: Path) -> list[ListedEntry]:
    """`bootctl list` on `esp`, in bootctl's (= systemd-boot's) menu order."""
    script = 'mount --bind "$1" "$1" && exec "$2" --esp-path="$1" --no-variables --no-pager list'
    env = dict(os.environ, SYSTEMD_RELAX_ESP_CHECKS="1", SYSTEMD_COLORS="0")
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(esp), str(bootctl)],
        check=False, capture_output=True, text=True, env=env, timeout=30,
    )
    if r.returncode != 0:
        raise RuntimeError(f"bootctl list failed ({r.returncode}): {r.stderr}")
    out: list[ListedEntry] = []
    for block in r.stdout.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.strip().partition(": ")
            if sep:
                fields[key] = value
        if "id" not in fields:
            continue
        left = done = None
        tries = fields.get("tries", "")
        for part in tries.split(";"):
            words = part.split()
            if len(words) == 2 and words[1] == "left":
                left = int(words[0])
            if len(words) == 2 and words[1] == "done":
                done = int(words[0])
        out.append(ListedEntry(fields["id"], fields.get("source", ""), "(default)" in fields.get("title", ""),
                               left, done))
    return out


if __name__ == "__main__":
    path, why = fetch()
    print(path if path else f"bootctl unavailable: {why}")
