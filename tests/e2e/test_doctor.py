"""`ota-agent doctor` on a simulated device: every check passes on a fresh one (exit
0), and each thing a bring-up gets wrong fails its own check with the fix, with a
non-zero exit; `--json` carries the same checks. The checks run against a `Host`
whose unit directories the test chooses, as they run against the real system."""

from __future__ import annotations

import json
from pathlib import Path

from agent import doctor
from agent.daemon import build_device
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory, DeviceFactory, Images


def checks(device: SimDevice, *extra: str) -> tuple[int, dict[str, dict[str, str]]]:
    r = device.agent("doctor", "--json", *extra)
    doc = json.loads(r.out)
    assert doc["ok"] is (r.rc == 0)
    return r.rc, {c["name"]: c for c in doc["checks"]}


def test_a_fresh_simulated_device_passes_every_check(device: SimDevice) -> None:
    r = device.agent("doctor")
    assert r.rc == 0, r.out
    lines = r.out.splitlines()
    assert lines[-1] == "doctor: all checks passed"
    assert [line.split()[0] for line in lines[:-1]] == ["OK"] * 6 + ["SKIP", "OK"]


def test_each_bring_up_mistake_fails_its_own_check_with_the_fix(device: SimDevice) -> None:
    (device.dir / "cmdline").write_text("console=ttyS0\n")
    (device.dir / "bootloader.json").unlink()
    (device.dir / "keys" / "signing.pub").write_text("not a key\n")
    with (device.dir / "slot-B.img").open("r+b") as f:
        f.truncate(4 << 20)
    rc, by_name = checks(device)
    assert rc == 1
    failed = {name for name, c in by_name.items() if c["status"] == "fail"}
    assert failed == {"slot marker", "bootloader state", "keyring", "slot sizes rootfs"}
    assert "ota-agent bootloader init" in by_name["bootloader state"]["fix"]
    assert "ota.slot=" in by_name["slot marker"]["fix"]
    text = device.agent("doctor").out
    assert "FAIL  keyring:" in text
    assert "-- fix: install the release signing key" in text
    assert text.splitlines()[-1] == "doctor: 4 check(s) failed"


def test_a_bundle_larger_than_the_slots_fails_the_slot_checks(
    device: SimDevice, make_bundle: BundleFactory, images: Images
) -> None:
    bundle = make_bundle("2.0", image=images.v2)
    for b in ("A", "B"):
        with (device.dir / f"slot-{b}.img").open("r+b") as f:
            f.truncate(5 << 20)
    rc, by_name = checks(device, "--bundle", str(bundle))
    assert rc == 1
    assert by_name["slot B rootfs"]["status"] == "fail"
    assert f"the image needs {images.v2.size}" in by_name["slot B rootfs"]["detail"]
    assert checks(device)[0] == 0  # without the bundle nothing says the slots are too small


def test_units_are_looked_up_in_the_hosts_unit_directories(make_device: DeviceFactory, tmp_path: Path) -> None:
    sim = make_device()
    dev = build_device(sim.config)
    units = tmp_path / "units"
    units.mkdir()
    host = doctor.Host(unit_dirs=(units,))
    report = doctor.doctor(dev, host, checks=(doctor.check_units,))
    assert not report.ok
    assert "ota-agent.service, ota-boot-check.service" in report.checks[0].detail
    for unit in doctor.UNITS:
        (units / unit).write_text("[Unit]\n")
    assert doctor.doctor(dev, host, checks=(doctor.check_units,)).ok


def test_a_missing_watchdog_device_fails(make_device: DeviceFactory, tmp_path: Path) -> None:
    sim = make_device()
    text = sim.config.read_text().replace('backend = "sim"\npath = "."', f'backend = "dev"\npath = "{tmp_path}/wd"')
    sim.config.write_text(text)
    rc, by_name = checks(sim)
    assert rc == 1
    assert by_name["watchdog"]["status"] == "fail"
    assert "No such file" in by_name["watchdog"]["detail"]
    assert by_name["systemd units"]["status"] == "fail"  # not a simulated device any more
