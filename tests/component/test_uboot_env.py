"""Our U-Boot environment reader/writer against the real tools, both directions:
libubootenv's fw_printenv/fw_setenv (0.3.2) and u-boot-tools' mkenvimage (2023.01),
on file-backed environments described by a test-written fw_env.config; single and
redundant layouts, several env sizes, copy choice including the flags wraparound,
power cuts inside and between copies, and corrupt or missing environments."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hw.bootloader import model
from hw.bootloader.model import BootState, SlotBoot, SlotBootState
from hw.bootloader.uboot import UBootEnv
from hw.bootloader.uboot_env import UBootEnvStore, encode_copy
from hw.errors import BootEnvError
from tests.component._uboot import fw_printenv, fw_setenv, mkenvimage, needs_env_tools, run_tool, write_config

pytestmark = needs_env_tools

SIZES = [0x2000, 0x4000, 0x10000, 0x40000]
VALUES = {
    "bootcmd": "run distro_bootcmd; echo ${BOOT_ORDER} && bootz ${kernel_addr_r} - ${fdt_addr_r}",
    "empty_next": "x",
    "equals": "a=b=c",
    "quotes": "\"'` $dollar \\back",
    "unicode": "ümlaut ✓ 中文",
    "long": "y" * 1000,
    "ethaddr": "02:81:4a:58:bd:80",
}


def single(tmp_path: Path, size: int) -> Path:
    return write_config(tmp_path / "fw_env.config", (tmp_path / "env.bin", 0), size=size)


def redundant_two_files(tmp_path: Path, size: int) -> Path:
    return write_config(tmp_path / "fw_env.config", (tmp_path / "env1.bin", 0), (tmp_path / "env2.bin", 0), size=size)


def redundant_one_file(tmp_path: Path, size: int) -> Path:
    dev = tmp_path / "disk.img"
    return write_config(tmp_path / "fw_env.config", (dev, 0x10000), (dev, 0x10000 + size), size=size)


LAYOUTS = {"single": single, "redundant-two-files": redundant_two_files, "redundant-one-file": redundant_one_file}


def blank_layout(kind: str, tmp_path: Path, size: int) -> Path:
    """The layout with every copy holding an env mkenvimage made (flags 1 when redundant)."""
    config = LAYOUTS[kind](tmp_path, size)
    cfg = UBootEnvStore(config).config()
    blob = mkenvimage("bootdelay=0\n", size, tmp_path / "seed.bin", redundant=cfg.redundant)
    for loc in cfg.copies:
        with loc.device.open("ab") as f:
            f.truncate(max(f.tell(), loc.offset + size))
        with loc.device.open("r+b") as f:
            f.seek(loc.offset)
            f.write(blob)
    return config


def raw(config: Path, index: int) -> bytes:
    loc = UBootEnvStore(config).config().copies[index]
    with loc.device.open("rb") as f:
        f.seek(loc.offset)
        return f.read(loc.size)


def put(config: Path, index: int, blob: bytes) -> None:
    loc = UBootEnvStore(config).config().copies[index]
    with loc.device.open("r+b") as f:
        f.seek(loc.offset)
        f.write(blob)


# --- byte-for-byte and both directions ----------------------------------------------------


@pytest.mark.parametrize("pad", [0x00, 0xFF])
@pytest.mark.parametrize("redundant", [False, True], ids=["single", "redundant"])
@pytest.mark.parametrize("size", SIZES, ids=hex)
def test_copy_is_byte_identical_to_mkenvimage(tmp_path: Path, size: int, redundant: bool, pad: int) -> None:
    text = "".join(f"{k}={VALUES[k]}\n" for k in sorted(VALUES))
    theirs = mkenvimage(text, size, tmp_path / "env.bin", redundant=redundant, pad=pad)
    assert encode_copy(VALUES, size, redundant=redundant, flags=1, pad=pad) == theirs


@pytest.mark.parametrize("size", SIZES, ids=hex)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_fw_printenv_reads_every_value_we_write(tmp_path: Path, kind: str, size: int) -> None:
    config = blank_layout(kind, tmp_path, size)
    UBootEnvStore(config).update(VALUES)
    assert fw_printenv(config) == {"bootdelay": "0", **VALUES}


@pytest.mark.parametrize("size", SIZES, ids=hex)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_we_read_every_value_fw_setenv_writes(tmp_path: Path, kind: str, size: int) -> None:
    config = blank_layout(kind, tmp_path, size)
    for name, value in VALUES.items():
        fw_setenv(config, name, value)
    fw_setenv(config, "bootdelay")  # delete
    assert dict(UBootEnvStore(config).read().variables) == VALUES


@pytest.mark.parametrize(
    ("flags", "expected"),
    [((1, 1), 0), ((5, 5), 0), ((0, 1), 1), ((1, 0), 0), ((255, 0), 1), ((0, 255), 0),
     ((254, 255), 1), ((7, 9), 1), ((9, 7), 0), ((128, 0), 0), ((0, 128), 1), ((255, 1), 0)],
)
def test_copy_choice_matches_fw_printenv(tmp_path: Path, flags: tuple[int, int], expected: int) -> None:
    config = redundant_two_files(tmp_path, 0x4000)
    for i in (0, 1):
        blob = encode_copy({"copy": str(i)}, 0x4000, redundant=True, flags=flags[i])
        (tmp_path / f"env{i + 1}.bin").write_bytes(blob)
    snap = UBootEnvStore(config).read()
    assert (snap.current, snap.flags, snap.variables["copy"]) == (expected, flags[expected], str(expected))
    assert fw_printenv(config)["copy"] == str(expected)


@pytest.mark.parametrize("bad", [0, 1])
def test_one_invalid_copy_loses_whatever_its_flags_say(tmp_path: Path, bad: int) -> None:
    config = redundant_two_files(tmp_path, 0x4000)
    for i in (0, 1):
        blob = bytearray(encode_copy({"copy": str(i)}, 0x4000, redundant=True, flags=10 if i == bad else 3))
        if i == bad:
            blob[200] ^= 1
        (tmp_path / f"env{i + 1}.bin").write_bytes(blob)
    assert UBootEnvStore(config).read().variables["copy"] == fw_printenv(config)["copy"] == str(1 - bad)


@pytest.mark.parametrize("kind", ["redundant-two-files", "redundant-one-file"])
def test_write_goes_to_the_inactive_copy_with_flags_plus_one_like_fw_setenv(tmp_path: Path, kind: str) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    results = []
    for directory, write in ((ours, lambda c: UBootEnvStore(c).update({"k": "v"})),
                             (theirs, lambda c: fw_setenv(c, "k", "v"))):
        config = blank_layout(kind, directory, 0x4000)
        put(config, 1, encode_copy({"bootdelay": "0"}, 0x4000, redundant=True, flags=7))  # copy 2 current
        before = [raw(config, 0), raw(config, 1)]
        write(config)
        after = [raw(config, 0), raw(config, 1)]
        assert after[1] == before[1], "the current copy must not be touched"
        results.append((after[0][4], fw_printenv(config)))
    assert results[0] == results[1] == (8, {"bootdelay": "0", "k": "v"})


def test_alternating_writers_agree_through_the_flags_wraparound(tmp_path: Path) -> None:
    config = redundant_one_file(tmp_path, 0x2000)
    (tmp_path / "disk.img").write_bytes(bytes(0x20000))
    put(config, 0, encode_copy({"n": "0"}, 0x2000, redundant=True, flags=250))
    put(config, 1, encode_copy({"n": "-1"}, 0x2000, redundant=True, flags=249))
    store = UBootEnvStore(config)
    seen = []
    for n in range(1, 13):  # flags 251 ... 255, 0, 1, ... : the counter wraps half-way
        if n % 2:
            store.update({"n": str(n)})
        else:
            fw_setenv(config, "n", str(n))
        snap = store.read()
        seen.append(snap.flags)
        assert snap.variables["n"] == fw_printenv(config)["n"] == str(n)
    assert seen == [251, 252, 253, 254, 255, 0, 1, 2, 3, 4, 5, 6]


# --- power cuts ---------------------------------------------------------------------------


@pytest.mark.parametrize("keep_new", [0, 1, 4, 5, 6, 40, 0x1000, 0x3FFF])
@pytest.mark.parametrize("kind", ["redundant-two-files", "redundant-one-file"])
def test_redundant_env_survives_a_cut_inside_the_new_copy(tmp_path: Path, kind: str, keep_new: int) -> None:
    config = blank_layout(kind, tmp_path, 0x4000)
    store = UBootEnvStore(config)
    store.update({"state": "old", "filler": "o" * 5000})
    target = 1 - store.read().current
    old = raw(config, target)
    store.update({"state": "new", "filler": "n" * 5000})
    new = raw(config, target)
    put(config, target, new[:keep_new] + old[keep_new:])  # the write stopped after keep_new bytes
    assert store.read().variables["state"] == fw_printenv(config)["state"] == "old"


def test_redundant_env_cut_between_two_stores_keeps_the_first(tmp_path: Path) -> None:
    config = blank_layout("redundant-one-file", tmp_path, 0x4000)
    store = UBootEnvStore(config)
    store.update({"state": "first"})  # complete: written and fsynced
    target = 1 - store.read().current
    before_second = raw(config, target)
    store.update({"state": "second"})
    put(config, target, before_second)  # power went before any byte of the second store landed
    assert store.read().variables["state"] == fw_printenv(config)["state"] == "first"
    store.update({"state": "third"})  # and the next store carries on from there
    assert store.read().variables["state"] == fw_printenv(config)["state"] == "third"


def test_single_copy_in_place_torn_write_is_a_loud_error_like_fw_printenv(tmp_path: Path) -> None:
    # One copy at an offset inside a bigger file (a raw partition): no way to be safe.
    config = write_config(tmp_path / "fw_env.config", (tmp_path / "disk.img", 0x1000), size=0x2000)
    (tmp_path / "disk.img").write_bytes(bytes(0x4000))
    put(config, 0, encode_copy({"state": "old"}, 0x2000, redundant=False))
    old = raw(config, 0)
    UBootEnvStore(config).update({"state": "new"})
    put(config, 0, raw(config, 0)[:12] + old[12:])  # cut inside the value: "state=ne" + "d"
    with pytest.raises(BootEnvError, match=r"no valid environment copy.*bad CRC"):
        UBootEnvStore(config).read()
    assert run_tool("fw_printenv", "-c", config, check=False).returncode != 0


_WRITER = """
import sys
from pathlib import Path
from hw.bootloader.uboot_env import UBootEnvStore
store = UBootEnvStore(Path(sys.argv[1]))
n = int(store.read().variables["n"])
while True:
    n += 1
    store.update({"n": str(n), "filler": str(n) * 2000})
    if n % 10 == 0:
        print(n, flush=True)
"""


@pytest.mark.parametrize("kind", ["single", "redundant-one-file"])
def test_killing_the_writer_at_random_moments_never_leaves_an_invalid_env(tmp_path: Path, kind: str) -> None:
    config = blank_layout(kind, tmp_path, 0x10000)
    UBootEnvStore(config).update({"n": "0"})
    rng = random.Random(4886)
    last = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stderr is not None
        progress = proc.stdout.readline()  # it has written at least 10 times: now cut
        time.sleep(rng.uniform(0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        err = proc.stderr.read().decode()
        proc.stdout.close()
        proc.stderr.close()
        assert progress, err
        n = int(fw_printenv(config)["n"])
        assert int(UBootEnvStore(config).read().variables["n"]) == n
        assert n > last, "the writer made progress and nothing went backwards"
        last = n


# --- errors -------------------------------------------------------------------------------


def test_both_copies_corrupt_is_a_clear_error_and_fw_printenv_fails_too(tmp_path: Path) -> None:
    config = blank_layout("redundant-two-files", tmp_path, 0x4000)
    for i in (0, 1):
        blob = bytearray(raw(config, i))
        blob[10] ^= 0xFF
        put(config, i, bytes(blob))
    with pytest.raises(BootEnvError, match=r"uboot backend .*no valid environment copy .*env1.bin@0x0: bad CRC; "
                                           r".*env2.bin@0x0: bad CRC"):
        UBootEnv(config, ("A", "B")).load()
    assert run_tool("fw_printenv", "-c", config, check=False).returncode != 0
    with pytest.raises(BootEnvError, match="no valid environment copy"):
        UBootEnv(config, ("A", "B")).store(BootState.initial(("A", "B")))  # never a silent fresh env


@pytest.mark.parametrize(
    ("config_text", "prepare", "message"),
    [
        ("{d}/absent.bin 0 0x2000\n", None, r"cannot open .*absent.bin@0x0: No such file"),
        ("{d}/env.bin 0 0x2000\n", b"\0" * 0x2000, "no valid environment copy .*bad CRC"),
        ("{d}/env.bin 0 0x2000\n", b"\xff" * 0x1000, "short read: 4096 of 8192 bytes"),
        ("{d}/env.bin zero 0x2000\n", b"", "offset or size is not a number"),
        ("{d}/env.bin 0\n", b"", "need 'device offset size'"),
        ("{d}/env.bin 0 0x2000\n{d}/env2.bin 0 0x4000\n", b"", r"differ in size \(0x2000 != 0x4000\)"),
        ("{d}/env.bin 0 0x2000\n{d}/env.bin 0x1000 0x2000\n", b"", "overlap"),
        ("{d}/env.bin 0 0x40000000\n", b"", "env size 0x40000000 not in"),
        ("/dev/mtd0 0 0x2000\n", b"", "MTD/UBI storage is not supported"),
        ("# only a comment\n\n", b"", "no environment location configured"),
    ],
)
def test_corrupt_or_missing_env_is_a_clear_boot_env_error(
    tmp_path: Path, config_text: str, prepare: bytes | None, message: str
) -> None:
    config = tmp_path / "fw_env.config"
    config.write_text(config_text.format(d=tmp_path))
    if prepare is not None:
        (tmp_path / "env.bin").write_bytes(prepare)
    with pytest.raises(BootEnvError, match=message):
        UBootEnv(config, ("A", "B")).load()


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BootEnvError, match=r"cannot read config: No such file"):
        UBootEnv(tmp_path / "nope.config", ("A", "B")).load()


def test_env_too_full_for_the_change_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    config = blank_layout("single", tmp_path, 0x2000)
    store = UBootEnvStore(config)
    room = 0x2000 - 4 - len(b"bootdelay=0\0") - len(b"big=\0") - 1
    store.update({"big": "x" * room})  # exactly full
    assert fw_printenv(config)["big"] == "x" * room
    before = raw(config, 0)
    with pytest.raises(BootEnvError, match="only 8188 fit"):
        store.update({"big": "x" * (room + 1)})
    assert raw(config, 0) == before


# --- the BootState codec on real files ----------------------------------------------------


def test_store_keeps_every_variable_it_does_not_own(tmp_path: Path) -> None:
    config = blank_layout("redundant-one-file", tmp_path, 0x10000)
    for name, value in VALUES.items():
        fw_setenv(config, name, value)
    foreign = fw_printenv(config)
    env = UBootEnv(config, ("A", "B"))
    env.create()
    env.store(model.set_primary(env.load(), "B", 3))
    env.store(model.mark_good(env.load(), "B"))
    after = fw_printenv(config)
    assert {k: after[k] for k in foreign} == foreign
    assert set(after) - set(foreign) == {"BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT", "OTA_LAST_GOOD"}


def test_create_makes_a_fresh_env_fw_printenv_reads(tmp_path: Path) -> None:
    config = redundant_two_files(tmp_path, 0x4000)
    UBootEnv(config, ("A", "B")).create()
    assert fw_printenv(config) == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3", "OTA_LAST_GOOD": "A"}
    assert UBootEnv(config, ("A", "B")).load() == BootState.initial(("A", "B"))


def test_create_over_storage_without_a_valid_env_refuses(tmp_path: Path) -> None:
    config = single(tmp_path, 0x2000)
    (tmp_path / "env.bin").write_bytes(b"\xff" * 0x2000)  # erased: U-Boot runs on its built-in env
    with pytest.raises(BootEnvError, match="no valid environment copy"):
        UBootEnv(config, ("A", "B")).create()
    assert (tmp_path / "env.bin").read_bytes() == b"\xff" * 0x2000


def test_env_rauc_wrote_with_fw_setenv_reads_as_committed_slots(tmp_path: Path) -> None:
    config = blank_layout("redundant-two-files", tmp_path, 0x4000)
    # RAUC's U-Boot backend: set-primary B (3 attempts, hex), then mark-bad A (removed from BOOT_ORDER).
    fw_setenv(config, "BOOT_A_LEFT", "3")
    fw_setenv(config, "BOOT_B_LEFT", "3")
    fw_setenv(config, "BOOT_ORDER", "B A")
    fw_setenv(config, "BOOT_A_LEFT", "0")
    fw_setenv(config, "BOOT_ORDER", "B")
    state = UBootEnv(config, ("A", "B")).load()
    assert state == BootState(("B", "A"), {"B": SlotBoot(SlotBootState.GOOD), "A": SlotBoot(SlotBootState.BAD)})
