"""glibc's allocator tuned for installs: large blocks in their own mappings, the op
threads' small blocks in two heaps, so freed memory leaves the resident set."""

from __future__ import annotations

import contextlib
import ctypes

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameters
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 1 << 20
_ARENA_MAX = 2


def bound_allocator() -> None:
    """Have glibc serve every allocation of 1 MiB or more with its own mapping, returned
    to the system when freed. Without a fixed threshold glibc raises it to the size of
    each large block freed (up to 32 MiB), and later extents, payloads and dictionaries
    come from the heap and stay resident after use: ~8 MiB more peak RSS for a delta
    (docs/bundle-format.md section 9.1). And keep the smaller blocks the op threads
    free in two heaps (arenas), not one per thread, each holding on to its own
    freed memory (agent.oprunner). Process-wide and harmless elsewhere; not glibc: no-op."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_ARENA_MAX, _ARENA_MAX)
