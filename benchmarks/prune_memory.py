"""Resident memory of ``armor_modifier.prune`` layer by layer, under three ways of handling the
solves' freed memory (``armor_modifier/allocator.py``):

- ``trim`` (the library's): glibc's dynamic mmap threshold, ``malloc_trim`` after each Linear;
- ``fixed``: the threshold fixed at 4 MiB through ``mallopt``, no trim (``prune``'s way before);
- ``dynamic``: glibc's defaults alone, no trim.

One process per run: ``prune(MODEL, num_iterations=N, reconstruction_steps=0)`` (ARMOR without
reconstruction, as the scale issue's memory target asks; 16 x 512 WikiVital-train windows, 10 %
wrapper budget, nothing saved), with a note after every decoder layer's compression of the
process's resident memory (``/proc/self/statm``) and its peak so far (``ru_maxrss``).

Usage::

    python benchmarks/prune_memory.py --model qwen2.5-coder-0.5b --iterations 1 \\
        --allocator trim --json trim.json      # and --allocator fixed, dynamic
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a name armor prune accepts")
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allocator", choices=["trim", "fixed", "dynamic"], default="trim",
                    help="trim: the library's; fixed: 4 MiB mmap threshold, no trim; "
                    "dynamic: glibc's defaults, no trim")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from armor_modifier import pruning
    from armor_modifier.modifier import base, compressor

    if args.allocator != "trim":
        compressor.release_free_memory = lambda: False
    if args.allocator == "fixed":
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        assert libc.mallopt(-3, 4 << 20), "mallopt(M_MMAP_THRESHOLD, 4 MiB) refused"
    layers: list[dict[str, float]] = []
    epoch_end = base.ARMORModifier.on_sequential_epoch_end

    def noting(self, *a, **k):
        epoch_end(self, *a, **k)
        layers.append({"rss_mib": round(_rss_mib()), "peak_mib": round(_peak_mib())})

    base.ARMORModifier.on_sequential_epoch_end = noting
    start = time.perf_counter()
    pruning.prune(args.model, None, num_iterations=args.iterations, reconstruction_steps=0)
    row = {
        "model": args.model, "iterations": args.iterations, "allocator": args.allocator,
        "seconds": round(time.perf_counter() - start, 1), "peak_mib": round(_peak_mib()),
        "layers": layers,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in row.items() if k != "layers"}))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
