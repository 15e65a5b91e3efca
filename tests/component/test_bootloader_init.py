"""`ota-agent bootloader init` on every backend, checked with the bootloader's own
tools: `fw_printenv` (both redundant copies), `grub-editenv list` and systemd's
`bootctl list`. A new device gets every slot good with the first one primary; a
re-run changes nothing; a state that differs is refused without --force and kept
byte for byte; --force initialises it and keeps what is not ours (U-Boot's
bootcmd, GRUB's saved_entry, a BLS entry's kernel lines)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.daemon import build_device
from bundler.format.signing import generate_key
from hw.bootloader import model
from tests.component._bootctl import fetch, list_entries
from tests.component._grubemu import editenv, editenv_list, needs_grub_editenv
from tests.component._uboot import fw_printenv, fw_setenv, needs_env_tools
from tests.fixtures.factory import UBOOT_ENV_SIZE, blank_device

BOOTCTL, WHY = fetch()
needs_bootctl = pytest.mark.skipif(BOOTCTL is None, reason=f"bootctl unavailable: {WHY}")


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    return generate_key(tmp_path / "signing")[1]


def init(config: Path, *extra: str) -> tuple[int, dict[str, object]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["-c", str(config), "bootloader", "init", "--json", *extra])
    text = out.getvalue() if rc == 0 else err.getvalue()
    return rc, json.loads(text)


def cut_copy(env_file: Path, index: int) -> None:
    """Destroy one redundant copy's CRC: the other one must carry the whole state."""
    data = bytearray(env_file.read_bytes())
    data[index * UBOOT_ENV_SIZE] ^= 0xFF
    env_file.write_bytes(bytes(data))


UBOOT_INITIAL = {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3", "OTA_LAST_GOOD": "A"}
GRUB_INITIAL = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0", "OTA_LAST_GOOD": "A"}


@needs_env_tools
def test_uboot_init_writes_both_redundant_copies_fw_printenv_reads(tmp_path: Path, keyring: Path) -> None:
    config = blank_device(tmp_path / "dev", backend="uboot", keyring=keyring)
    rc, doc = init(config)
    assert rc == 0
    assert doc["result"] == "created"
    fw_config = tmp_path / "dev" / "fw_env.config"
    assert fw_printenv(fw_config) == UBOOT_INITIAL
    env_file = tmp_path / "dev" / "uboot.env"
    for index in (0, 1):
        saved = env_file.read_bytes()
        cut_copy(env_file, index)
        assert fw_printenv(fw_config) == UBOOT_INITIAL, f"copy {1 - index} alone"
        env_file.write_bytes(saved)
    assert init(config) == (0, {**doc, "result": "already-initialised", "previous": doc["previous"].replace(
        "nothing", "order A B (A good, B good), last good A")})


@needs_env_tools
def test_uboot_init_refuses_a_valid_other_state_and_force_keeps_foreign_variables(
    tmp_path: Path, keyring: Path
) -> None:
    config = blank_device(tmp_path / "dev", backend="uboot", keyring=keyring)
    assert init(config)[0] == 0
    fw_config = tmp_path / "dev" / "fw_env.config"
    fw_setenv(fw_config, "bootcmd", "run ota_boot")
    device = build_device(config)
    device.bootloader.set_primary("B", 2)
    before = (tmp_path / "dev" / "uboot.env").read_bytes()
    rc, err = init(config)
    assert rc == 1
    assert "refusing to overwrite order B A" in str(err["error"])
    assert "--force" in str(err["error"])
    assert (tmp_path / "dev" / "uboot.env").read_bytes() == before
    rc, doc = init(config, "--force")
    assert rc == 0
    assert doc["result"] == "replaced"
    assert fw_printenv(fw_config) == {**UBOOT_INITIAL, "bootcmd": "run ota_boot"}


@needs_env_tools
def test_uboot_init_refuses_storage_without_a_valid_copy_even_when_forced(tmp_path: Path, keyring: Path) -> None:
    config = blank_device(tmp_path / "dev", backend="uboot", keyring=keyring)
    (tmp_path / "dev" / "uboot.env").write_bytes(b"\xff" * (2 * UBOOT_ENV_SIZE))  # erased flash
    for extra in ((), ("--force",)):
        rc, err = init(config, *extra)
        assert rc == 1
        assert "no valid environment copy" in str(err["error"])
    assert (tmp_path / "dev" / "uboot.env").read_bytes() == b"\xff" * (2 * UBOOT_ENV_SIZE)


@needs_grub_editenv
def test_grub_init_on_a_block_grub_editenv_made_keeps_saved_entry(tmp_path: Path, keyring: Path) -> None:
    config = blank_device(tmp_path / "dev", backend="grub", keyring=keyring)
    grubenv = tmp_path / "dev" / "grubenv"
    editenv(grubenv, "create")
    editenv(grubenv, "set", "saved_entry=Debian")
    rc, doc = init(config)
    assert rc == 0
    assert doc["result"] == "created"
    assert editenv_list(grubenv) == {"saved_entry": "Debian", **GRUB_INITIAL}
    assert init(config)[1]["result"] == "already-initialised"


@needs_grub_editenv
def test_grub_init_refuses_a_damaged_state_and_force_repairs_it(tmp_path: Path, keyring: Path) -> None:
    config = blank_device(tmp_path / "dev", backend="grub", keyring=keyring)
    grubenv = tmp_path / "dev" / "grubenv"
    editenv(grubenv, "create")
    editenv(grubenv, "set", "ORDER=A C", "A_OK=1", "saved_entry=x")  # C is not a slot
    before = grubenv.read_bytes()
    rc, err = init(config)
    assert rc == 1
    assert "damaged state" in str(err["error"])
    assert "unknown slots ['C']" in str(err["error"])
    assert grubenv.read_bytes() == before
    rc, doc = init(config, "--force")
    assert rc == 0
    assert doc["result"] == "replaced"
    assert editenv_list(grubenv) == {"saved_entry": "x", **GRUB_INITIAL}


@needs_grub_editenv
def test_grub_init_over_a_file_that_is_no_grubenv_block_needs_force(tmp_path: Path, keyring: Path) -> None:
    config = blank_device(tmp_path / "dev", backend="grub", keyring=keyring)
    grubenv = tmp_path / "dev" / "grubenv"
    grubenv.write_bytes(b"\0" * 100)
    assert init(config)[0] == 1
    assert init(config, "--force")[0] == 0
    assert editenv_list(grubenv) == GRUB_INITIAL


def _kernels(esp: Path) -> None:
    for s in ("A", "B"):  # bootctl, like systemd-boot, wants the kernel an entry names
        (esp / "ota" / s).mkdir(parents=True, exist_ok=True)
        (esp / "ota" / s / "vmlinuz").write_bytes(b"kernel")
        (esp / "ota" / s / "initrd.img").write_bytes(b"initrd")


@needs_bootctl
def test_bls_init_makes_entries_bootctl_lists_with_the_first_slot_default(tmp_path: Path, keyring: Path) -> None:
    assert BOOTCTL is not None
    config = blank_device(tmp_path / "dev", backend="bls", keyring=keyring)
    esp = tmp_path / "dev" / "boot"
    rc, doc = init(config)
    assert rc == 0
    assert doc["result"] == "created"
    _kernels(esp)
    listed = [e for e in list_entries(BOOTCTL, esp) if e.id.startswith("ota-")]
    want = [("ota-2-A.conf", True, None), ("ota-1-B.conf", False, None)]
    assert [(e.id, e.default, e.tries_left) for e in listed] == want


@needs_bootctl
def test_bls_force_init_renames_existing_entries_and_keeps_their_kernel_lines(tmp_path: Path, keyring: Path) -> None:
    assert BOOTCTL is not None
    config = blank_device(tmp_path / "dev", backend="bls", keyring=keyring)
    esp = tmp_path / "dev" / "boot"
    assert init(config)[0] == 0
    _kernels(esp)
    entry = next((esp / "loader" / "entries").glob("ota-*-B.conf"))
    entry.write_text(entry.read_text().replace("ro ota.slot=B", "ro quiet ota.slot=B"))
    build_device(config).bootloader.set_primary("B", 3)
    names = sorted(p.name for p in (esp / "loader" / "entries").iterdir())
    rc, err = init(config)
    assert rc == 1
    assert "refusing to overwrite order B A" in str(err["error"])
    assert sorted(p.name for p in (esp / "loader" / "entries").iterdir()) == names
    assert init(config, "--force")[0] == 0
    state = build_device(config).bootloader.state()
    assert state == model.BootState.initial(("A", "B"))
    listed = [e for e in list_entries(BOOTCTL, esp) if e.id.startswith("ota-")]
    assert [(e.default, e.tries_left) for e in listed] == [(True, None), (False, None)]
    b_entry = next((esp / "loader" / "entries").glob("ota-*-B.conf"))
    assert "ro quiet ota.slot=B" in b_entry.read_text()


def test_sim_init_and_refusal(tmp_path: Path, keyring: Path) -> None:
    config = blank_device(tmp_path / "dev", backend="sim", keyring=keyring)
    assert init(config)[1]["result"] == "created"
    build_device(config).bootloader.mark_bad("B")
    assert init(config)[0] == 1
    assert init(config, "--force")[1]["result"] == "replaced"
    assert build_device(config).bootloader.state() == model.BootState.initial(("A", "B"))
