"""Our grubenv reader/writer against the real ``grub-editenv`` (GRUB 2.06),
in both directions: byte-identical results for the same edits, special
characters, the full-block limit, corrupt files, and power cuts during our
atomic replace."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hw.bootloader.grub import GrubEnv
from hw.bootloader.grubenv import BLOCK_SIZE, EnvBlock, read_block, write_block
from hw.bootloader.model import BootState, mark_good, set_primary
from hw.errors import BootEnvError
from tests.component._grubemu import editenv, editenv_list, needs_grub_editenv

pytestmark = needs_grub_editenv

SPECIAL = [
    "",
    "two words",
    "back\\slash",
    "trailing\\",
    "\\\\",
    "new\nline",
    "\n",
    "hash # and = equals",
    "quotes \"'` and $dollar ${x}",
    "tab\tand semicolon; && |",
    "ümlaut ✓ 中文",
    "x" * 300,
]


def ours(path: Path) -> dict[str, str]:
    return read_block(path).as_dict()


def test_created_block_is_byte_identical_to_grub_editenv_create(tmp_path: Path) -> None:
    editenv(tmp_path / "theirs", "create")
    write_block(tmp_path / "ours", EnvBlock.fresh())
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()


def test_set_and_unset_produce_the_same_bytes_as_grub_editenv(tmp_path: Path) -> None:
    theirs, mine = tmp_path / "theirs", tmp_path / "ours"
    editenv(theirs, "create")
    write_block(mine, EnvBlock.fresh())
    rng = random.Random(4886)
    ops = [("set", "ORDER", "A B"), ("set", "A_OK", "1"), ("set", "saved_entry", "Debian GNU/Linux")]
    for _ in range(40):
        name = rng.choice(["ORDER", "A_OK", "A_TRY", "saved_entry", "x", "long_name_here"])
        if rng.random() < 0.25:
            ops.append(("unset", name, ""))
        else:
            ops.append(("set", name, rng.choice(SPECIAL[:-1]) + str(rng.randrange(1000))))
    for op, name, value in ops:
        block = read_block(mine)
        if op == "set":
            block.set(name, value)
            editenv(theirs, "set", f"{name}={value}")
        else:
            block.unset(name)
            editenv(theirs, "unset", name)
        write_block(mine, block)
        assert mine.read_bytes() == theirs.read_bytes(), f"after {op} {name}={value!r}"


@pytest.mark.parametrize("value", SPECIAL, ids=range(len(SPECIAL)))
def test_special_characters_survive_both_directions(tmp_path: Path, value: str) -> None:
    # grub-editenv -> our reader
    theirs = tmp_path / "theirs"
    editenv(theirs, "create")
    editenv(theirs, "set", f"v={value}", "after=1")
    assert ours(theirs) == {"v": value, "after": "1"}
    # our writer -> grub-editenv (list prints values raw, so compare the whole output)
    mine = tmp_path / "ours"
    block = EnvBlock.fresh()
    block.set("v", value)
    block.set("after", "1")
    write_block(mine, block)
    assert editenv(mine, "list") == f"v={value}\nafter=1\n"
    assert mine.read_bytes() == theirs.read_bytes()


def test_unset_by_grub_editenv_and_by_us_agree(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv(path, "create")
    editenv(path, "set", "a=1", "b=two\nlines", "c=3")
    editenv(path, "unset", "b")
    assert ours(path) == {"a": "1", "c": "3"}
    block = read_block(path)
    block.unset("a")
    write_block(path, block)
    assert editenv_list(path) == {"c": "3"}


def test_full_block_fails_in_both_tools_at_the_same_size(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv(path, "create")
    room = read_block(path).free - len("big=\n")
    editenv(path, "set", "big=" + "x" * room)  # exactly fits in grub-editenv ...
    assert read_block(path).free == 0  # ... and in ours
    before = path.read_bytes()
    proc = subprocess.run(["grub-editenv", str(path), "set", "one=1"], check=False, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "too small" in proc.stderr
    block = read_block(path)
    with pytest.raises(BootEnvError, match=r"block full: setting 'one' needs 6 more bytes, 0 of 1024 free"):
        block.set("one", "1")
    write_block(path, block)
    assert path.read_bytes() == before


def test_store_refuses_state_when_the_block_is_full_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    env = GrubEnv(path, ("A", "B"))
    env.create()
    editenv(path, "set", "filler=" + "f" * (read_block(path).free - len("filler=\n")))
    before = path.read_bytes()
    with pytest.raises(BootEnvError, match="block full") as err:
        env.store(set_primary(env.load(), "B", 3))  # needs room for OTA_B_LEFT=3
    assert err.value.path == str(path)
    assert path.read_bytes() == before
    assert env.load() == BootState.initial(("A", "B"))


def test_store_preserves_variables_it_does_not_own(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    env = GrubEnv(path, ("A", "B"))
    env.create()
    editenv(path, "set", "saved_entry=Advanced options>Debian", "next_entry=", "kernelopts=quiet splash\\x")
    env.store(set_primary(env.load(), "B", 2))
    env.store(mark_good(env.load(), "B"))
    listed = editenv_list(path)
    assert listed["saved_entry"] == "Advanced options>Debian"
    assert listed["next_entry"] == ""
    assert listed["kernelopts"] == "quiet splash\\x"
    assert listed["ORDER"] == "B A"
    assert (listed["B_OK"], listed["B_TRY"], listed["OTA_LAST_GOOD"]) == ("1", "0", "B")
    assert "OTA_B_LEFT" not in listed


def test_reads_env_that_rauc_wrote_with_grub_editenv(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    editenv(path, "create")
    # RAUC's grub backend sets all pairs in one grub-editenv call (mark-active B, then mark-bad A).
    editenv(path, "set", "A_OK=1", "A_TRY=0", "ORDER=B A", "B_OK=1", "B_TRY=0")
    editenv(path, "set", "A_OK=0", "A_TRY=0")
    state = GrubEnv(path, ("A", "B")).load()
    assert state.order == ("B", "A")
    assert state.slots["A"].bootable is False
    assert state.slots["B"].bootable is True
    assert state.last_good is None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: b"# GRUB Environment BLOCK\n" + d[25:], "not a GRUB environment block"),
        (lambda d: b"\0" * BLOCK_SIZE, "not a GRUB environment block"),
        (lambda d: d[:600], "600 bytes"),
        (lambda d: d[:1000] + b"\0" * 24, "NUL"),
        (lambda d: d[: d.rfind(b"\n")] + b"#" + d[d.rfind(b"\n") + 1 :], "padding"),
    ],
    ids=["header", "zeroed", "truncated", "zeroed-tail", "newline-lost"],
)
def test_corrupt_env_is_a_boot_env_error(tmp_path: Path, damage: object, message: str) -> None:
    path = tmp_path / "grubenv"
    env = GrubEnv(path, ("A", "B"))
    env.create()
    assert callable(damage)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(BootEnvError, match=message) as err:
        env.load()
    assert err.value.path == str(path)
    assert str(err.value).startswith("grub backend")


# --- power cuts -------------------------------------------------------------

_CHILD = r"""
import os, signal, sys
from pathlib import Path
import ota_common.fsutil
from hw.bootloader.grub import GrubEnv
from hw.bootloader.model import BootState, set_primary

path, mode = Path(sys.argv[1]), sys.argv[2]
env = GrubEnv(path, ("A", "B"))
if mode == "cut-before-rename":
    def cut(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)
    ota_common.fsutil.os.replace = cut
    env.store(set_primary(env.load(), "B", 3))
else:
    print("ready", flush=True)
    committed = BootState.initial(("A", "B"))
    while True:
        env.store(set_primary(committed, "B", 3))
        env.store(committed)
"""


def _child(path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def test_a_write_rewrites_the_block_in_place_keeping_its_inode_and_blocks(tmp_path: Path) -> None:
    # GRUB reads ext4 without replaying its journal: after a power cut a renamed
    # file can still look like the old inode over reused blocks ("invalid
    # environment block", found on the virtual device). In place, nothing moves.
    path = tmp_path / "grubenv"
    env = GrubEnv(path, ("A", "B"))
    env.create()
    before = os.stat(path)
    env.store(set_primary(env.load(), "B", 3))
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (before.st_ino, 1024)
    assert editenv_list(path)["OTA_B_LEFT"] == "3"
    assert [p for p in tmp_path.iterdir() if p != path] == []  # no temp file either


def test_a_stray_temp_file_from_an_older_cut_does_not_block_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    env = GrubEnv(path, ("A", "B"))
    env.create()
    (tmp_path / ".grubenv.tmp-stray").write_bytes(b"partial")
    env.store(set_primary(env.load(), "B", 3))
    assert editenv_list(path)["OTA_B_LEFT"] == "3"
    assert env.load().slots["B"].tries_left == 3


def test_cuts_at_random_moments_always_leave_a_valid_env(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    env = GrubEnv(path, ("A", "B"))
    env.create()
    committed = env.load()
    trial = set_primary(committed, "B", 3)
    rng = random.Random(490)
    for _ in range(12):
        child = _child(path, "loop")
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert len(path.read_bytes()) == BLOCK_SIZE
        assert env.load() in (committed, trial)
        assert editenv_list(path)["ORDER"] in ("A B", "B A")
