"""Resident memory of a long-running mapper: how much, and giving freed memory back (Linux).

Why this exists: glibc's malloc keeps memory that Python, numpy and torch have freed inside the
process (at the top of each heap, and in one heap per thread that ever allocated) instead of
returning it to the system. A mapper frees hundreds of MB after every keyframe and instance
update (renders, gradients, tracker traces), so its resident size ratchets up to its peaks and
stays there, and on a robot that memory is lost to every other process. Measured on
`runs/dev/rss_probe.py` (80 keyframes of the live bench's scene, one thread): 1086 MB at the
end as is, 914 MB with a trim after every keyframe (and two heaps, which one thread hardly
uses), growth per keyframe 0.62 -> 0.50 MB, and no slower (254 s against 263 s). Also tried,
not used: a smaller mmap threshold saved a little more but made mapping 25% slower (every
image-sized tensor became an mmap); two heaps for the whole process (glibc makes up to 8 per
core) with a trim after every step, in the node, came with a live-bench mask-query p95 of
120 ms against 82 (threads then wait on each other's heap locks).

Everything here is best effort: on a libc without these calls (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

_libc: Optional[ctypes.CDLL] = None
_libc_loaded = False


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "malloc_trim"):
                _libc = libc
        except OSError:
            _libc = None
    return _libc


def release_free_memory() -> bool:
    """Return the memory malloc holds free to the system (glibc's malloc_trim: the top of each
    heap and whole free pages inside it). A few ms; call after a large piece of work, not in a
    loop. Returns whether any memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def resident_mb() -> float:
    """Resident memory now (the peak alone cannot show whether memory stays flat); Linux only,
    NaN elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")
