"""Fuzz key file loading: load_public_key and load_private_key on a file
holding arbitrary bytes (PEM framing, DER, key types)."""

from __future__ import annotations

import contextlib

from bundler.format.signing import load_private_key, load_public_key
from tests.fuzz._harness import EXPECTED, main, scratch_dir


def one_input(data: bytes) -> None:
    path = scratch_dir() / "key.pem"
    path.write_bytes(data)
    with contextlib.suppress(*EXPECTED):
        load_public_key(path)
    load_private_key(path)


if __name__ == "__main__":
    main(one_input)
