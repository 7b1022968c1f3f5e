"""The solves' freed memory handed back to the system (``armor_modifier/allocator.py``)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_freed_heap_blocks_go_back_to_the_system_only_when_released():
    """In a fresh interpreter: after freeing a 24 MiB block, glibc's dynamic threshold serves the
    next 16 MiB blocks from the heap, and freeing them leaves the resident memory where it was;
    ``release_free_memory`` then hands them back."""
    code = """
import ctypes, ctypes.util, sys
from armor_modifier.allocator import release_free_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
libc.free(libc.malloc(24 << 20))
blocks = [libc.malloc(16 << 20) for _ in range(8)]
for block in blocks:
    ctypes.memset(block, 1, 16 << 20)
held = rss()
for block in blocks[:-1]:
    libc.free(block)
if sys.argv[1] == "release":
    assert release_free_memory()
print((held - rss()) >> 20)
"""

    def released(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        return int(out)

    assert released("release") >= 100  # 112 MiB freed back (observed 112)
    assert released("keep") < 100  # the heap keeps them (observed 0)


def test_every_solve_is_followed_by_a_release(monkeypatch):
    """``LinearCompressor.compress`` releases once per solved Linear, after writing it back."""
    import torch
    from torch import nn

    from armor_modifier.core import SolverSettings
    from armor_modifier.modifier import compressor

    calls: list[int] = []
    linears = [nn.Linear(16, 8, bias=False), nn.Linear(16, 16, bias=False)]
    engine = compressor.LinearCompressor(
        {m: f"layer.{i}" for i, m in enumerate(linears)},
        SolverSettings(wrapper_block_size=4, num_iterations=1),
        from_budget=False,
    )
    monkeypatch.setattr(
        compressor, "release_free_memory", lambda: calls.append(len(engine.results)) or True
    )
    for module in linears:
        engine.add_input(module, torch.randn(64, 16))
    engine.compress()
    assert calls == [1, 2]
