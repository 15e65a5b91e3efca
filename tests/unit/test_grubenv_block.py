"""The grubenv block codec on bytes (pure): GRUB's escaping, in-place edits,
fixed size, and strict reading. Byte-for-byte agreement with the real
grub-editenv is in tests/component/test_grubenv.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw.bootloader.grubenv import BLOCK_SIZE, SIGNATURE, WARNING, EnvBlock, read_block, write_block
from hw.errors import BootEnvError

names = st.text(st.characters(codec="utf-8", exclude_characters="=\n\\\0#"), min_size=1, max_size=8)
values = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=24)


def test_fresh_block_is_signature_warning_and_hash_padding() -> None:
    data = EnvBlock.fresh().to_bytes()
    assert len(data) == BLOCK_SIZE
    assert data.startswith(SIGNATURE + WARNING)
    assert set(data[len(SIGNATURE) + len(WARNING) :]) == {ord("#")}


def test_backslash_and_newline_are_escaped_and_nothing_else() -> None:
    block = EnvBlock.fresh()
    block.set("v", "a\\b\nc #=$\"' é")
    assert b"v=a\\\\b\\\nc #=$\"' \xc3\xa9\n" in block.to_bytes()
    assert EnvBlock.parse(block.to_bytes()).get("v") == "a\\b\nc #=$\"' é"


@settings(max_examples=200)
@given(st.dictionaries(names, values, max_size=8))
def test_any_variables_that_fit_round_trip(variables: dict[str, str]) -> None:
    block = EnvBlock.fresh()
    for k, v in variables.items():
        block.set(k, v)
    again = EnvBlock.parse(block.to_bytes())
    assert again.as_dict() == variables
    assert again.to_bytes() == block.to_bytes()


def test_editing_keeps_positions_and_size() -> None:
    block = EnvBlock.fresh()
    for k, v in (("a", "1"), ("b", "2"), ("c", "3")):
        block.set(k, v)
    block.set("a", "much longer")
    block.unset("b")
    block.set("b", "back")
    assert list(block.as_dict()) == ["a", "c", "b"]
    assert len(block.to_bytes()) == BLOCK_SIZE


def test_full_block_refuses_and_stays_unchanged() -> None:
    block = EnvBlock.fresh()
    block.set("x", "y" * (block.free - len("x=\n")))
    assert block.free == 0
    before = block.to_bytes()
    with pytest.raises(BootEnvError, match="block full"):
        block.set("z", "")
    with pytest.raises(BootEnvError, match="cannot grow"):
        block.set("x", "y" * 2000)
    assert block.to_bytes() == before


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"# GRUB Environment Blok\n".ljust(BLOCK_SIZE, b"#"), "not a GRUB environment block"),
        (b"", "not a GRUB environment block"),
        ((SIGNATURE + b"a=1\nbroken\n").ljust(BLOCK_SIZE, b"#"), "not name=value"),
        ((SIGNATURE + b"a=1\\").ljust(BLOCK_SIZE, b"#"), "padding"),
        ((SIGNATURE + b"a=1\\\n").ljust(BLOCK_SIZE, b"#"), "not terminated"),
        ((SIGNATURE + b"a=1\na=2\n").ljust(BLOCK_SIZE, b"#"), "defined twice"),
        ((SIGNATURE + b"a=1\0\n").ljust(BLOCK_SIZE, b"#"), "NUL"),
        ((SIGNATURE + b"a=1\n").ljust(BLOCK_SIZE - 4, b"#") + b"\0\0\0\0", "NUL"),
    ],
    ids=["signature", "empty", "no-equals", "padding", "unterminated", "duplicate", "nul", "zeroed-tail"],
)
def test_corrupt_blocks_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(BootEnvError, match=message):
        EnvBlock.parse(data)


@pytest.mark.parametrize("name", ["", "a=b", "a\nb", "#a", "a\\b"])
def test_names_grubenv_cannot_hold_are_refused(name: str) -> None:
    with pytest.raises(BootEnvError):
        EnvBlock.fresh().set(name, "1")


def test_file_of_wrong_size_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(EnvBlock.fresh().to_bytes()[:512])
    with pytest.raises(BootEnvError, match="grub-editenv FILE create") as err:
        read_block(path)
    assert err.value.path == str(path)
    path.write_bytes(EnvBlock.fresh().to_bytes() + b"#")
    with pytest.raises(BootEnvError, match="more than 1024"):
        read_block(path)


def test_unwritable_directory_is_a_boot_env_error(tmp_path: Path) -> None:
    with pytest.raises(BootEnvError, match="cannot write"):
        write_block(tmp_path / "missing-dir" / "grubenv", EnvBlock.fresh())
