"""Typed handles on C library functions Python's os module lacks, for the one
process-wide libc (`ctypes.CDLL(None)`, errno kept for `ctypes.get_errno`)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any


def function(names: Sequence[str], argtypes: Sequence[Any], restype: Any = ctypes.c_int) -> Callable[..., int] | None:
    """The first of `names` the C library has, with these argument and result types;
    None where it has none of them (not glibc, or an older one)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for name in names:
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = list(argtypes)
            fn.restype = restype
            return fn  # type: ignore[no-any-return]
    return None
