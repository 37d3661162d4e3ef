"""Keeping a streamed pass's host memory from growing layer by layer.

A streamed pass frees one layer's buffers and allocates the next one's from several threads (the
prefetching reader, XLA's host threads). glibc gives each thread its own malloc arena (up to 8 per
core) and keeps freed chunks in them, so without help the resident memory creeps up with every layer
read although what is live stays at about two layers. Two remedies, both no-ops where the C library
lacks them (musl, macOS):

- `limit_malloc_arenas`: at most a few arenas from now on (glibc's `M_ARENA_MAX`, the setting
  `MALLOC_ARENA_MAX` makes at start-up; a value the user set in the environment is left alone). It
  counts most when called before JAX starts its threads: the `grape` command calls it first thing, and
  a streamed sweep calls it again for Python callers (threads that already have an arena keep it);
- `release_free_memory`: return the free pages of every arena to the OS (`malloc_trim(0)`), called
  after each layer.

Measured on a 32-layer streamed prune (BENCHMARKS.md, layer streaming): peak anonymous RSS 1.26 GB with
neither, 0.92 GB with the trim, 0.71 GB with both (8 layers: 1.07, 0.82, 0.64).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter number


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS (glibc `malloc_trim(0)`); False where unsupported."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def limit_malloc_arenas(count: int = 2) -> bool:
    """Let glibc create no more than `count` malloc arenas from now on; False where unsupported or when
    `MALLOC_ARENA_MAX` is set (the user's choice stands)."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, count))
