"""Giving freed heap memory back to the system (core/resident_memory.py), measured on this process."""
import numpy as np
import pytest

from instascene_ros.core import resident_memory


def test_release_returns_freed_heap_pages_that_malloc_would_keep():
    if resident_memory._glibc() is None or resident_memory.resident_mb() != resident_memory.resident_mb():
        pytest.skip("needs glibc and /proc (Linux)")
    # 64 KB blocks come from malloc's heap (below its mmap threshold); keeping every 40th alive
    # leaves the freed ones between live blocks, where malloc's own trim (top of heap) cannot reach
    blocks = [np.ones(8192) for _ in range(3000)]  # ~190 MB, touched
    kept = blocks[::40]
    del blocks
    before = resident_memory.resident_mb()
    assert resident_memory.release_free_memory()
    after = resident_memory.resident_mb()
    assert before - after > 100, (before, after)
    assert all(block[0] == 1.0 and block[-1] == 1.0 for block in kept)  # live memory untouched
