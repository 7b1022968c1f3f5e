"""Peak memory of one ``factorize`` against the estimate the modifier's memory check uses.

For each ``ROWSxCOLS`` shape a fresh interpreter builds a random weight and Hessian, notes its
resident memory, runs ``factorize`` (output objective) and reports the rise of its peak resident
memory (``ru_maxrss``) above that level, beside
:func:`armor_modifier.modifier.memory.solve_bytes` for the shape. ``estimate / measured`` should
stay above 1 (the check's constants are meant as an upper estimate).

Usage: ``python benchmarks/solve_memory.py [--shapes 4096x1024 1024x4096 ...] [--block 64]
[--iterations 2] [--json rows.json]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, torch
torch.set_num_threads(1)
from armor_modifier.core import factorize
m, n, b, iterations = (int(v) for v in sys.argv[1:5])
g = torch.Generator().manual_seed(0)
X = torch.randn(2 * n, n, generator=g)
H = X.T @ X / (2 * n)
del X
W = torch.randn(m, n, generator=g)
before = int(open("/proc/self/statm").read().split()[1]) * 4096
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
factorize(W, H=H, wrapper_block_size=b, num_iterations=iterations, objective="output")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rise": peak - before, "earlier_peak_hides": peak == peak_before}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", nargs="+",
        default=["4096x1024", "1024x4096", "2048x2048", "8192x2048", "2048x8192"],
    )  # fmt: skip
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    from armor_modifier.modifier.memory import solve_bytes

    print("| shape | measured MiB | estimate MiB | estimate / measured |\n|---|---|---|---|")
    rows = []
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(m), str(n), str(args.block), str(args.iterations)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        child = json.loads(out.stdout.strip().splitlines()[-1])
        estimate = solve_bytes(m, n, with_hessian=True)
        note = " (an earlier peak hides the solve's)" if child["earlier_peak_hides"] else ""
        print(
            f"| {shape} | {child['rise'] / 2**20:.0f}{note} | {estimate / 2**20:.0f} | "
            f"{estimate / child['rise']:.2f} |",
            flush=True,
        )
        rows.append({"shape": shape, "measured_mib": round(child["rise"] / 2**20),
                     "estimate_mib": round(estimate / 2**20),
                     "ratio": round(estimate / child["rise"], 2),
                     "hidden": child["earlier_peak_hides"]})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
