"""Hand the solves' freed memory back to the system after each Linear (glibc only).

Every Linear's solve allocates and frees a few hundred MiB of temporaries. glibc serves blocks
of up to 32 MiB from its heap once such a block has been freed (its dynamic mmap threshold);
freed heap blocks stay counted in the process's resident memory, so without help it creeps up
layer after layer and each solve's peak starts higher. Fixing the threshold low (4 MiB, this
project's earlier answer) keeps the memory down but maps fresh pages for every large temporary
of every iteration, and the page faults cost time.

:func:`release_free_memory` (``malloc_trim``) after each Linear's solve keeps the heap's reuse
within a solve and returns what is free between solves (``LinearCompressor`` calls it);
``docs/results.md#prune_memory`` measures the settings side by side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

__all__ = ["release_free_memory"]


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or ``None`` on other systems and C libraries (musl has no ``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the heap's free pages to the system; whether glibc did (``False`` where it is not
    glibc, or nothing could be returned)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
