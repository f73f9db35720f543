"""Giving freed memory back to the system after a large request.

glibc keeps what a thread frees in that thread's arena: tokenizing a 1.2 MB prompt on a worker
thread left the front-end 110 MB larger for good; ``malloc_trim`` returns all but ~20 MB. A no-op
where the C library has no ``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util

LARGE_INPUT = 1 << 20  # characters of prompt or messages worth a trim after their request is prepared

_libc_path = ctypes.util.find_library("c")
_trim = getattr(ctypes.CDLL(_libc_path), "malloc_trim", None) if _libc_path else None


def give_back() -> None:
    """Return free heap memory of every arena to the system (takes milliseconds)."""
    if _trim is not None:
        _trim(0)
