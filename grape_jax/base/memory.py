"""Giving freed host memory back to the operating system between the layers of a streamed pass.

A streamed pass frees one layer's buffers and allocates the next one's from several threads (the
prefetching reader, XLA's host threads), and glibc keeps freed chunks in per-thread arenas: without a
trim the process's resident memory creeps up with every layer read, although what is live stays at
about two layers (measured: a 32-layer streamed prune peaked 0.42 GB higher than with the arenas
trimmed). `release_free_memory` asks the allocator to return what is free; it is a no-op where the C
library has no `malloc_trim` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return None if libc is None else libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS (glibc `malloc_trim(0)`); False where unsupported."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
