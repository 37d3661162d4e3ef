"""`base.memory.release_free_memory`: freed heap pages go back to the OS (glibc), as the streamed passes
rely on between layers."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from grape_jax.base.memory import limit_malloc_arenas, release_free_memory


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_heap_pages_are_returned():
    chunks = [np.ones(8192) for _ in range(3000)]  # 64 KiB each: heap chunks, not mmaps (~200 MB)
    pinned = np.ones(8192)  # allocated last: keeps the heap's top in use, so free() alone trims nothing
    del chunks
    before = _rss_anon()
    assert release_free_memory()
    after = _rss_anon()
    assert before - after > 100e6, (before, after)
    del pinned


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_arena_limit_respects_the_environment(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_malloc_arenas()
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas(8)  # a limit this test process can live with
