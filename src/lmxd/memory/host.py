"""Host memory the daemon gives back to the system once it is done with it (glibc's malloc).

Parked agents' states (bytearrays on a CPU build) and llama.cpp's host buffers are megabytes
each. glibc serves such blocks from ``mmap`` and returns them on free, until the first free of
one: it then raises the size it maps from the heap to that block's size, and later blocks come
from the heap, where a free keeps the memory in the process. A 10-minute `lmxd bench soak`
ended with 850 MiB more resident than it started with, every agent gone and every model
unloaded. Fixing the threshold at 1 MiB keeps every large block mapped, and ``malloc_trim``
returns the heap's free pages when the last model goes.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MAPPED_FROM = 1 << 20  # blocks of this size and more are mapped, and unmapped when freed


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def map_large_blocks() -> None:
    """Serve blocks of 1 MiB and more from ``mmap`` for the life of the process (call once, at
    the start); a libc without ``mallopt`` is left as it is."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MAPPED_FROM)


def give_back_heap() -> None:
    """Return the heap's free pages to the system (``malloc_trim``), where libc has it."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
