"""Keep freed memory for reuse: dense maps are hundreds of MB, and fresh pages cost more than the
pooling or activation that fills them.

glibc malloc serves blocks above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MB by default) with
fresh ``mmap`` pages and returns them on free, so every full-resolution map of a dense net pays a
page fault per 4 KB page (2.2 million faults per 1080 x 720 descriptor-net pass, measured; the pass
took 4.4 s, and 2.8 s with 0.45 million faults after this call). PyTorch's CPU performance guide
recommends jemalloc or tcmalloc for the same reason. This is a process-wide setting, so the
library never makes it on its own: applications (the ``cnnkit`` command, the benchmarks) opt in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve blocks up to ``threshold`` bytes from the heap and keep up to that much freed memory
    instead of returning it to the OS. Returns False where glibc's ``mallopt`` is unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1
        # trimming only when more than 2 GB sit free at the top of the heap
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
    except (OSError, AttributeError):
        return False
    log.debug("malloc keeps freed blocks up to %d bytes: %s", threshold, ok)
    return ok
