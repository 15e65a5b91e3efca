"""The errors of `bundler.oci`, all `BuildError`s (so `ota-bundle` prints one line):

BuildError
  OciError               an image, layout, archive or registry is unusable
    DigestMismatch       a blob's bytes do not match the digest that names it
    UnsafeEntry          a layer entry would land outside the root, or cannot be kept
    RegistryError        the registry refused or answered something unusable
"""

from __future__ import annotations

from bundler.build import BuildError


class OciError(BuildError):
    """An OCI image, layout, archive or registry answer cannot be used."""


class DigestMismatch(OciError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class UnsafeEntry(OciError):
    """A layer entry is refused: it escapes the root (absolute path, `..`,
    a symlinked parent, a hardlink outside) or asks for what cannot be kept."""

    def __init__(self, layer: str, name: str, reason: str) -> None:
        super().__init__(f"layer {layer}: entry {name!r}: {reason}")
        self.layer = layer
        self.name = name


class RegistryError(OciError):
    """`transient`: the registry could not be reached (asking again may help)."""

    def __init__(self, what: str, message: str, status_code: int | None = None, *, transient: bool = False) -> None:
        super().__init__(f"{what}: {message}")
        self.status_code = status_code
        self.transient = transient
