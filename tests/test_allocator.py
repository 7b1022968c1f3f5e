"""glibc's mmap threshold fixed for the solves (``armor_modifier/allocator.py``)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from armor_modifier.allocator import fix_mmap_threshold

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt's M_MMAP_THRESHOLD is glibc's")
def test_the_threshold_is_set_and_large_blocks_go_back_to_the_system():
    """In a fresh interpreter: after freeing a 24 MiB block, glibc's dynamic threshold would
    serve the next 16 MiB blocks from the heap; fixed at 4 MiB, freeing them lowers the
    resident memory again."""
    code = """
import ctypes, ctypes.util, sys
from armor_modifier.allocator import fix_mmap_threshold
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
libc.free(libc.malloc(24 << 20))
blocks = [libc.malloc(16 << 20) for _ in range(8)]
for block in blocks:
    ctypes.memset(block, 1, 16 << 20)
held = rss()
for block in blocks[:-1]:
    libc.free(block)
print((held - rss()) >> 20)
"""

    def released(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        return int(out)

    assert released("fixed") >= 100  # 112 MiB freed back (observed 112)
    assert released("dynamic") < 100  # the heap keeps them (observed 0)


def test_the_environment_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert fix_mmap_threshold() is False
