"""The base and target images the delta harness applies ops against, built the
same way in every process (the harness and the seed generator agree on them).
Four changed sections, apart by unchanged filler (copied, so each is its own
op): squashfs-like back-to-back zlib level-9 blocks, a zlib-made gzip member
(DEFLATE pieces), a GNU gzip member (DEFLATE_BLOCKS pieces) and an x86-like
program whose calls moved (X86 pieces and extents)."""

from __future__ import annotations

import functools
import gzip
import random
import zlib

from tests.fixtures.synthetic import gnu_gzip, program, prose


def _blocks(rng: random.Random, contents: list[bytes]) -> bytes:
    return b"".join(rng.randbytes(2) + zlib.compress(c, 9) for c in contents)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4096)


@functools.cache
def pair() -> tuple[bytes, bytes]:
    files = [prose(k, 24 * 1024) for k in range(6)]
    edited = list(files)
    edited[2] = edited[2][:3000] + b"patched" + edited[2][3000:]
    edited[4] = edited[4][:100] + edited[4][700:]
    log = prose(1, 200 * 1024)
    rng = random.Random(20261202)
    filler = [rng.randbytes(64 * 1024) for _ in range(4)]
    base = [_blocks(random.Random(1), files), gzip.compress(files[0], 9, mtime=0), gnu_gzip(log),
            program(7, 0, 60)]
    target = [b"moved" + _blocks(random.Random(2), edited), gzip.compress(edited[2], 9, mtime=0),
              gnu_gzip(prose(2, 3 * 1024) + log), program(7, 300, 60)]
    return (b"".join(_pad(part) + fill for part, fill in zip(base, filler, strict=True)),
            b"".join(_pad(part) + fill for part, fill in zip(target, filler, strict=True)))
