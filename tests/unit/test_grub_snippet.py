"""Static checks on the shipped GRUB snippet (its behaviour is tested in grub-emu,
tests/component/test_grub_script.py): it must run on Debian's signed EFI GRUB,
whose built-in modules are fixed (debian/build-efi-images: no `eval`, and
Secure Boot forbids `insmod` from disk), and its limits must match the backend's."""

from __future__ import annotations

import re
from pathlib import Path

from hw.bootloader.grub import MAX_TRIES

SNIPPET = Path(__file__).resolve().parents[2] / "hw" / "scripts" / "grub.cfg"

KEYWORDS = {"if", "then", "elif", "else", "fi", "for", "do", "done", "function", "break", "}"}
# commands of the script engine and of modules built into Debian's signed grubx64.efi
# (normal, test, loadenv, echo, configfile, true) plus the snippet's own function
ALLOWED = {"set", "unset", "export", "[", "test", "load_env", "save_env", "echo", "source", "true", "ota_read"}


def commands(text: str) -> set[str]:
    found: set[str] = set()
    for line in text.splitlines():
        code = re.sub(r'"[^"]*"', '""', line).split("#", 1)[0]
        for part in re.split(r";|\bthen\b|\belse\b|\bdo\b", code):
            words = part.split()
            while words and words[0] in KEYWORDS - {"function", "for"}:
                words = words[1:]
            if words and words[0] in ("function", "for"):
                words = []
            if words:
                found.add(words[0])
    return found


def test_snippet_uses_only_commands_of_debians_signed_grub() -> None:
    used = commands(SNIPPET.read_text())
    assert used <= ALLOWED, f"not available in Debian's signed GRUB: {sorted(used - ALLOWED)}"
    assert {"load_env", "save_env", "ota_read"} <= used


def test_decrement_table_covers_exactly_the_backends_max_tries() -> None:
    text = SNIPPET.read_text()
    steps = re.findall(r'\[ "\$ota_left" = (\d) \]; then set ota_next=(\d)', text)
    assert [(int(a), int(b)) for a, b in steps] == [(n, n - 1) for n in range(MAX_TRIES, 0, -1)]
