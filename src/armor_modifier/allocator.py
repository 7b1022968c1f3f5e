"""Keep freed solver memory from piling up in the heap (glibc only).

Every Linear's solve allocates and frees a few hundred MiB of temporaries. glibc serves large
allocations from their own mappings at first, but raises that threshold each time such a block
is freed, after which blocks of up to 32 MiB come from the heap, where freed ones fragment and
stay counted in the process's memory, so the resident memory creeps up layer after layer and
each solve's peak starts higher (docs/results.md, "resident memory through prune", measures both
settings on Qwen2.5-Coder-0.5B).

:func:`fix_mmap_threshold` fixes the threshold through ``mallopt``; :func:`armor_modifier.prune`
(and so ``armor prune``) calls it. Users of ``oneshot`` can set ``MALLOC_MMAP_THRESHOLD_=4194304``
in the environment for the same effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "fix_mmap_threshold"]

#: bytes from which an allocation gets its own mapping
MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; whether it was set (not on other C
    libraries or systems, nor when ``MALLOC_MMAP_THRESHOLD_`` already sets it)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # no libc found, or one without mallopt (musl)
        return False
