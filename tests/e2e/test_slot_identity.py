"""Two slots that are the same storage are refused by identity, never by path
text: at config load (every command stops with one line naming both slots and
nothing is touched), and again right before the target is opened for writing
(a config valid at load whose target file is later replaced by a link to the
booted slot: the install fails and both slots keep every byte)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.daemon import build_device
from agent.installer import install
from hw.errors import SlotError
from tests.e2e._sim import SimDevice, sha256_file

SLOT_B = 'bootname = "B"\nclass = "rootfs"\npath = "slot-B.img"\n'


def point_b_at(text: str, path: str) -> str:
    assert SLOT_B in text
    return text.replace(SLOT_B, SLOT_B.replace('"slot-B.img"', f'"{path}"'))


def same_path(d: Path, text: str) -> str:
    return point_b_at(text, "slot-A.img")


def absolute_spelling(d: Path, text: str) -> str:
    return point_b_at(text, str(d / "slot-A.img"))


def dotted_spelling(d: Path, text: str) -> str:
    return point_b_at(text, "./nowhere/../slot-A.img")


def symlink(d: Path, text: str) -> str:
    (d / "link-to-A.img").symlink_to("slot-A.img")
    return point_b_at(text, "link-to-A.img")


def hard_link(d: Path, text: str) -> str:
    os.link(d / "slot-A.img", d / "also-A.img")
    return point_b_at(text, "also-A.img")


def appfs_of_booted_group_on_b_rootfs(d: Path, text: str) -> str:
    (d / "app-B.img").write_bytes(bytes(1 << 20))
    return text.replace(
        "\n[health]",
        '\n[[slots]]\nbootname = "A"\nclass = "appfs"\npath = "slot-B.img"\n'
        '\n[[slots]]\nbootname = "B"\nclass = "appfs"\npath = "app-B.img"\n\n[health]',
        1,
    )


Edit = Callable[[Path, str], str]
CASES: list[tuple[Edit, list[str]]] = [
    (same_path, ["slot rootfs A", "slot rootfs B", "same file"]),
    (absolute_spelling, ["slot rootfs A", "slot rootfs B", "same file"]),
    (dotted_spelling, ["slot rootfs A", "slot rootfs B", "same file"]),
    (symlink, ["slot rootfs A", "slot rootfs B", "link-to-A.img", "same file"]),
    (hard_link, ["slot rootfs A", "slot rootfs B", "also-A.img", "same file"]),
    (appfs_of_booted_group_on_b_rootfs, ["slot rootfs B", "slot appfs A", "same file"]),
]


@pytest.mark.parametrize(("edit", "fragments"), CASES, ids=[e.__name__ for e, _ in CASES])
@pytest.mark.parametrize("command", [["status"], ["install"], ["boot-check", "--no-reboot"]], ids=lambda c: c[0])
def test_config_naming_one_storage_twice_is_refused_at_load_naming_both_slots(
    device: SimDevice, make_bundle: Callable[..., Path], edit: Edit, fragments: list[str], command: list[str]
) -> None:
    device.config.write_text(edit(device.dir, device.config.read_text()))
    if command == ["install"]:
        command = ["install", str(make_bundle("2.0"))]
    before = device.snapshot()
    line = device.agent(*command).one_error_line()
    assert str(device.config) in line
    assert "[[slots]]" in line
    assert "not distinct storage" in line
    for fragment in fragments:
        assert fragment in line, line
    assert device.snapshot() == before


def test_distinct_slots_that_do_not_exist_yet_load(device: SimDevice) -> None:
    text = point_b_at(device.config.read_text(), "not-yet-B.img")
    device.config.write_text(text.replace('path = "slot-A.img"', 'path = "not-yet-A.img"'))
    assert device.agent("status").rc == 0


def test_two_missing_paths_spelled_differently_are_the_same_slot(device: SimDevice) -> None:
    text = point_b_at(device.config.read_text(), "./x/../later.img")
    device.config.write_text(text.replace('path = "slot-A.img"', 'path = "later.img"'))
    line = device.agent("status").one_error_line()
    assert "both name" in line
    assert "later.img" in line


def _swap_symlink(d: Path) -> None:
    (d / "slot-B.img").rename(d / "slot-B.orig")
    (d / "slot-B.img").symlink_to(d / "slot-A.img")


def _swap_hard_link(d: Path) -> None:
    (d / "slot-B.img").rename(d / "slot-B.orig")
    os.link(d / "slot-A.img", d / "slot-B.img")


@pytest.mark.parametrize("swap", [_swap_symlink, _swap_hard_link], ids=["symlink", "hard link"])
def test_target_replaced_by_a_link_to_the_booted_slot_after_load_is_refused_before_writing(
    device: SimDevice, make_bundle: Callable[..., Path], swap: Callable[[Path], None]
) -> None:
    bundle = make_bundle("2.0")
    dev = build_device(device.config)  # the config is valid now
    a_before = sha256_file(device.slot_path("A"))
    b_before = sha256_file(device.slot_path("B"))
    swap(device.dir)
    with bundle.open("rb") as stream, pytest.raises(SlotError, match="overlaps") as info:
        install(dev, stream)
    message = str(info.value)
    assert "slot B" in message
    assert "booted slot A" in message
    assert str(device.slot_path("A")) in message
    assert sha256_file(device.slot_path("A")) == a_before
    assert sha256_file(device.dir / "slot-B.orig") == b_before
    assert device.outbox()[-1]["result"] == "failed"
