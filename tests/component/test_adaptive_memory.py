"""Adaptive download keeps the install memory bound: the worst legal bundle
(tests/component/_worst_bundles.py "everything-at-once": the most ops, maximal
REPLACE ops, the largest manifest), served by a real HTTP origin (`ota-fleet
serve`'s server), installed with `[download] adaptive = true` onto a device whose
booted slot holds the first half of the image: the first ops are produced from
the slot, the others fetched by Range. The child's peak RSS stays under 64 MiB,
the image is byte-exact, and less than the whole bundle was downloaded."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from agent import sim
from bundler.fleet.serve import BundleServer
from bundler.format.signing import generate_key, load_private_key
from tests.component._worst_bundles import COMPATIBLE, helper_floor, measure, worst_bundles

LIMIT_MIB = 64.0


def sha256_of(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while length:
            chunk = f.read(min(length, 1 << 20))
            h.update(chunk)
            length -= len(chunk)
    return h.hexdigest()


def test_adaptive_install_of_the_worst_bundle_stays_under_64_mib(tmp_path: Path, server: BundleServer) -> None:
    private, public = generate_key(tmp_path / "key")
    bundle = worst_bundles(tmp_path, load_private_key(private))["everything-at-once"]()
    factory = tmp_path / "factory.img"
    factory.write_bytes(bytes(4096))
    device = tmp_path / "device"
    slot_size = -(-bundle.image_size // 4096) * 4096 + 4096
    sim.init(sim.SimSpec(device, factory, public, COMPATIBLE, slot_size=slot_size))
    agent = str(Path(sys.executable).parent / "ota-agent")
    config = device / "agent.toml"
    first = measure([agent, "-c", str(config), "install", str(bundle.path)], tmp_path / "first.log")
    assert first.rc == 0, first.output
    # The booted slot A now holds the first half of the image, the target B nothing.
    half = bundle.image_size // 2
    with (device / "slot-B.img").open("rb") as src, (device / "slot-A.img").open("r+b") as dst:
        dst.write(src.read(half))
        dst.write(bytes(slot_size - half))
    (device / "slot-B.img").write_bytes(bytes(slot_size))
    config.write_text(config.read_text() + "\n[download]\nadaptive = true\n")
    shutil.copy(bundle.path, tmp_path / "www" / "worst.otab")
    floor = helper_floor(tmp_path / "floor.log")

    url = f"{server.url}/worst.otab"
    run = measure([agent, "-c", str(config), "install", "--reinstall", url], tmp_path / "run.log")

    assert run.rc == 0, run.output
    print(f"adaptive worst bundle: peak RSS {run.peak_rss_mib:.1f} MiB (floor {floor.peak_rss_mib:.1f})")
    assert sha256_of(device / "slot-B.img", bundle.image_size) == bundle.image_sha256
    status = measure([agent, "-c", str(config), "status", "--json"], tmp_path / "status.log")
    downloaded = json.loads(status.output)["last_result"]["downloaded"]
    assert 0 < downloaded < bundle.path.stat().st_size
    assert run.peak_rss_kib > 2 * floor.peak_rss_kib, "the number is the agent's, not the measuring helper's"
    assert run.peak_rss_mib < LIMIT_MIB, f"peak RSS {run.peak_rss_mib:.1f} MiB"
