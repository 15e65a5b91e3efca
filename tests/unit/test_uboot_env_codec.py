"""The pure parts of hw/bootloader/uboot_env.py: fw_env.config parsing, one
env copy's encoding and decoding, and the copy-choice rule (U-Boot's
env_import_redund, libubootenv's libuboot_load)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hw.bootloader.uboot_env import (
    EnvCopy,
    EnvLocation,
    FwEnvConfig,
    decode_copy,
    encode_copy,
    force_ro_path,
    parse_fw_env_config,
    select_current,
)
from hw.errors import BootEnvError


def test_config_numbers_are_read_as_libubootenv_reads_them() -> None:
    cfg = parse_fw_env_config(
        "# device offset size sector-size sectors\n"
        "/dev/mmcblk0 0x3f8000 0x4000 0x200 0x10  # first copy\n"
        "  \n"
        "/dev/mmcblk0 4177920 4000\n"  # offset decimal (strtoll base 0), size always hex
    )
    assert cfg.copies == (
        EnvLocation(Path("/dev/mmcblk0"), 0x3F8000, 0x4000, 0x200, 0x10),
        EnvLocation(Path("/dev/mmcblk0"), 4177920, 0x4000),
    )
    assert cfg.redundant
    assert parse_fw_env_config("/f 010 0x20\n").copies[0].offset == 8  # leading 0: octal
    assert parse_fw_env_config("/dev/mmcblk0boot1 -0x4000 0x4000\n").copies[0].offset == -0x4000


def test_config_renders_back_to_itself() -> None:
    cfg = FwEnvConfig((EnvLocation(Path("/a"), 0x10, 0x2000, 0x1000, 2), EnvLocation(Path("/b"), 0, 0x2000)))
    assert parse_fw_env_config(cfg.render()) == cfg


def test_config_with_more_than_two_copies_is_an_error() -> None:
    with pytest.raises(BootEnvError, match="3 locations configured"):
        parse_fw_env_config("/a 0 0x2000\n/b 0 0x2000\n/c 0 0x2000\n")


@pytest.mark.parametrize(
    ("flags", "valid", "expected"),
    [
        ((1, 1), (True, True), 0),
        ((1, 2), (True, True), 1),
        ((2, 1), (True, True), 0),
        ((255, 0), (True, True), 1),
        ((0, 255), (True, True), 0),
        ((255, 254), (True, True), 0),
        ((0, 1), (True, True), 1),
        ((9, 1), (False, True), 1),
        ((1, 9), (True, False), 0),
        ((1, 1), (False, False), None),
    ],
)
def test_copy_choice(flags: tuple[int, int], valid: tuple[bool, bool], expected: int | None) -> None:
    copies = [EnvCopy(v, f, {}) for f, v in zip(flags, valid, strict=True)]
    assert select_current(copies[0], copies[1]) == expected


@given(st.integers(0, 255))
def test_a_write_always_makes_the_written_copy_current(flags: int) -> None:
    current = EnvCopy(True, flags, {})
    written = EnvCopy(True, (flags + 1) & 0xFF, {})
    assert select_current(current, written) == 1
    assert select_current(written, current) == 0


_names = st.text(st.characters(blacklist_characters="=\0", blacklist_categories=("Cs",)), min_size=1, max_size=20)
_values = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=50)


@given(st.dictionaries(_names, _values, max_size=20), st.booleans(), st.integers(0, 255))
def test_encode_then_decode_is_lossless(variables: dict[str, str], redundant: bool, flags: int) -> None:
    blob = encode_copy(variables, 0x2000, redundant=redundant, flags=flags)
    copy = decode_copy(blob, redundant=redundant)
    assert (copy.valid, dict(copy.variables)) == (True, variables)
    assert copy.flags == (flags if redundant else 0)


def test_bytes_that_are_not_utf8_survive_a_round_trip() -> None:
    raw = _with_crc(b"k=\xff\xfe\0\xc3=\x80\0\0")
    variables = decode_copy(raw, redundant=False).variables
    assert encode_copy(variables, 64, redundant=False) == raw


def _with_crc(data: bytes, size: int = 64) -> bytes:
    data = data.ljust(size - 4, b"\0")
    return zlib.crc32(data).to_bytes(4, "little") + data


def test_decoding_drops_entries_libubootenv_drops_and_keeps_the_last_duplicate() -> None:
    variables = decode_copy(_with_crc(b"a=1\0junk\0=v\0a=2\0b=\0\0c=ignored\0"), redundant=False).variables
    assert variables == {"a": "2", "b": ""}


def test_empty_env_and_unterminated_env() -> None:
    assert decode_copy(_with_crc(b""), redundant=False) == EnvCopy(True, 0, {})
    unterminated = decode_copy(_with_crc(b"a=" + b"x" * 58, 64), redundant=False)
    assert (unterminated.valid, unterminated.problem) == (False, "last variable not NUL-terminated")


def test_bad_crc_is_reported_not_raised() -> None:
    blob = bytearray(encode_copy({"a": "1"}, 64, redundant=True, flags=4))
    blob[9] ^= 1
    assert decode_copy(bytes(blob), redundant=True) == EnvCopy(False, 4, {}, "bad CRC")


def test_the_flags_byte_is_outside_the_crc() -> None:
    blob = bytearray(encode_copy({"a": "1"}, 64, redundant=True, flags=4))
    blob[4] = 200
    assert decode_copy(bytes(blob), redundant=True).valid


@pytest.mark.parametrize(("variables", "message"), [
    ({"": "x"}, "invalid variable name"),
    ({"a=b": "x"}, "invalid variable name"),
    ({"a": "x\0y"}, "contains a NUL byte"),
    ({"a": "x" * 60}, "environment needs 64 bytes, only 60 fit in 0x40"),
])
def test_encoding_refuses_what_u_boot_could_not_read_back(variables: dict[str, str], message: str) -> None:
    with pytest.raises(BootEnvError, match=message):
        encode_copy(variables, 64, redundant=False)


@pytest.mark.parametrize(
    ("device", "switch"),
    [
        ("/dev/mmcblk0boot1", "/sys/class/block/mmcblk0boot1/force_ro"),
        ("/dev/block/mmcblk2boot0", "/sys/class/block/mmcblk2boot0/force_ro"),
        ("/dev/mmcblk0", None),
        ("/dev/mmcblk0p1", None),
        ("/boot/uboot.env", None),
    ],
)
def test_emmc_boot_partitions_are_unlocked_for_writes_like_libubootenv(device: str, switch: str | None) -> None:
    assert force_ro_path(Path(device)) == (Path(switch) if switch else None)
