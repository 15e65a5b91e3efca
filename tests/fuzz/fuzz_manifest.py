"""Fuzz manifest.parse directly on arbitrary bytes (JSON decoding, duplicate
keys, number literals, names, digests, times, the image entries)."""

from __future__ import annotations

from bundler.format.manifest import parse
from ota_common.errors import OtaError
from tests.fuzz._harness import main


def one_input(data: bytes) -> None:
    manifest = parse(data)
    try:
        again = parse(manifest.encode())
    except OtaError as e:  # not an expected error here: a manifest we accepted must re-encode validly
        raise AssertionError(f"accepted manifest does not survive its own canonical encoding: {e}") from e
    assert again.images == manifest.images
    assert (again.bundle_version, again.security_version) == (manifest.bundle_version, manifest.security_version)


if __name__ == "__main__":
    main(one_input)
