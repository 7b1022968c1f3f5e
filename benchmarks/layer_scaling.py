"""Layer scaling: SparseGPT's whole layer vs ONE ARMOR iteration (output objective), side by side.

For every ``rows x cols`` shape (SmolLM2-135M / Qwen2-0.5B-like / Llama-3-8B-like), one random
weight ``W`` and one random *correlated* Hessian ``H = X^T X / N + ridge`` (``X``: shared factors
plus noise, channel energies spanning two orders of magnitude) are built on ``--device``, then,
in one process:

- ``SparseGPT s``: the project's own :func:`armor_modifier.core.sparsegpt_prune` on the whole
  layer (the output objective's starting point);
- ``1 iter s``: one block-coordinate-descent iteration, the median gap between consecutive
  iterations of the ``--iterations`` run (``factorize``'s per-iteration callback);
- ``ratio``: ``1 iter s / SparseGPT s``;
- ``t1 - t0 s``: ``factorize(num_iterations=1) - factorize(num_iterations=0)``, both timed whole
  (the start, SparseGPT included, cancels), after one untimed ``factorize`` of the same shape
  (without it, on an H200, the first call's allocations made this negative); noisy where
  SparseGPT's own run-to-run spread exceeds one iteration;
- the relative output error ``||(W_hat - W) X^T||^2 / ||W X^T||^2`` (unridged ``H``) of SparseGPT
  and of ARMOR after ``--iterations`` iterations;
- peak memory: ``torch.cuda.max_memory_allocated`` per shape on CUDA; on CPU the process's
  ``ru_maxrss`` so far (monotone over the shapes).

``--precisions float32 bfloat16`` times the ARMOR side once per ``matmul_precision`` (the solver
setting, docs/settings.md) against the same SparseGPT run and problem, one row each; ``err /
fp32`` is the ARMOR error over the float32 row's.

The wrapper block size ``b`` is the project's own choice for one weight under a 10 % budget
(:meth:`SolverSettings.block_size_for`: the largest multiple of 4 dividing both dimensions with
``(m + n) b <= 0.1 m n``; 128 at 4096x4096), or ``--block``.

Usage: ``python benchmarks/layer_scaling.py [--device cpu|cuda] [--shapes 4096x4096 ...]
[--iterations 10] [--precisions float32 bfloat16] [--threads 1] [--json out.json]``. On CPU
the default is the small shapes only.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from typing import Any

ALL_SHAPES = (
    "576x576",
    "896x4864",
    "4864x896",
    "2048x2048",
    "4096x4096",
    "4096x14336",
    "14336x4096",
)
CPU_DEFAULT = ("576x576", "896x4864", "4864x896")


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x14336"`` -> ``(4096, 14336)`` (rows, cols); both multiples of 4."""
    try:
        m, n = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be ROWSxCOLS, e.g. 4096x4096; got {text!r}"
        ) from None
    if m <= 0 or n <= 0 or m % 4 or n % 4:
        raise argparse.ArgumentTypeError(f"both dimensions must be positive multiples of 4: {text}")
    return m, n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--shapes", nargs="+", type=parse_shape, default=None,
        help=f"ROWSxCOLS (default: {' '.join(CPU_DEFAULT)} on cpu, all of "
        f"{' '.join(ALL_SHAPES)} on cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--iterations", type=int, default=10, help="loss after this many (>= 2 for the median)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--budget", type=float, default=0.10, help="wrapper overhead budget")
    parser.add_argument("--block", type=int, default=None, help="force one wrapper block size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precisions", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
        help="solver matmul_precision values, each timed against the same SparseGPT run",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write the rows here (after every shape)")
    parser.add_argument(
        "--profile", action="store_true",
        help="instead: profile factorize's start and one iteration per shape and precision "
        "(torch.profiler, the 15 ops with the most self time)",
    )  # fmt: skip
    return parser


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[Any, float]:
    """``(fn(), seconds)`` with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def make_problem(m: int, n: int, device: Any, seed: int):
    """A random weight ``[m, n]`` and a correlated, full-rank Hessian ``[n, n]`` on ``device``.

    ``X [N, n]`` (``N = max(512, n / 2)`` tokens) is ``n / 8`` shared factors plus independent
    noise, each channel scaled by ``exp(N(0, 0.75^2))``; ``H = X^T X / N + 1e-3 mean(diag) I``.
    """
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    tokens, factors = max(512, n // 2), max(8, n // 8)
    X = (
        torch.randn(tokens, factors, generator=g, device=device)
        @ torch.randn(factors, n, generator=g, device=device)
        / factors**0.5
    )
    X += 0.5 * torch.randn(tokens, n, generator=g, device=device)
    X *= torch.exp(0.75 * torch.randn(n, generator=g, device=device))
    H = X.T @ X / tokens
    del X
    H.diagonal().add_(1e-3 * float(H.diagonal().mean()))
    rows = torch.exp(0.3 * torch.randn(m, 1, generator=g, device=device))
    W = torch.randn(m, n, generator=g, device=device) * rows / n**0.5
    return W, H


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_gib(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_shape(m: int, n: int, args: argparse.Namespace, device: Any) -> list[dict[str, Any]]:
    """One row per ``--precisions`` value: SparseGPT vs one ARMOR iteration on a ``[m, n]``
    problem (SparseGPT timed once)."""
    import torch

    from armor_modifier.core import SolverSettings, factorize, output_loss, sparsegpt_prune

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    W, H = make_problem(m, n, device, args.seed)
    settings = SolverSettings(max_wrapper_overhead=args.budget, wrapper_block_size=args.block)
    b = settings.block_size_for(m, n)
    sgpt, t_sgpt = None, 0.0
    rows = []
    for precision in args.precisions:
        settings = settings.replace(wrapper_block_size=b, matmul_precision=precision)
        factorize(W, H=H, settings=settings, num_iterations=1)  # untimed: allocator, handles
        if sgpt is None:
            sgpt, t_sgpt = timed(lambda: sparsegpt_prune(W, H), device)
        row = _armor_row(W, H, settings, args, device)
        row.update(
            shape=f"{m}x{n}", b=b, overhead=settings.overhead_for(m, n), sparsegpt_s=t_sgpt,
            ratio=row["one_iteration_s"] / t_sgpt,
            sparsegpt_error=output_loss(W, H, sgpt.weight), peak_gib=peak_gib(device),
        )  # fmt: skip
        rows.append(row)
    fp32 = next((r for r in rows if r["matmul_precision"] == "float32"), None)
    for row in rows:
        row["error_vs_float32"] = row["armor_error"] / fp32["armor_error"] if fp32 else None
    return rows


def _armor_row(W: Any, H: Any, settings: Any, args: argparse.Namespace, device: Any) -> dict:
    """The ARMOR columns of one row (the start, one iteration, ``--iterations``)."""
    from armor_modifier.core import factorize, output_loss

    _, t0 = timed(lambda: factorize(W, H=H, settings=settings, num_iterations=0), device)
    _, t1 = timed(lambda: factorize(W, H=H, settings=settings, num_iterations=1), device)
    stamps: list[float] = []
    # loss() ends in a host float, so each callback runs after the iteration's kernels finished
    factors, t_n = timed(
        lambda: factorize(
            W, H=H, settings=settings, num_iterations=args.iterations,
            callback=lambda _k, _loss: stamps.append(time.perf_counter()),
        ),
        device,
    )  # fmt: skip
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)]
    one = statistics.median(gaps) if gaps else t1 - t0
    return {
        "matmul_precision": settings.matmul_precision,
        "start_s": t0,
        "one_iteration_s": one,
        "t1_minus_t0_s": t1 - t0,
        "iterations": args.iterations,
        "iterations_run": len(factors.loss_history) - 1,
        "armor_error": output_loss(W, H, factors.dense()),
        "objective_start": factors.initial_loss,
        "objective_end": factors.final_loss,
        "num_fallbacks": factors.num_fallbacks,
        "total_n_iterations_s": t_n,
    }


def profile_shape(m: int, n: int, args: argparse.Namespace, device: Any) -> None:
    """Print where ``factorize(num_iterations=1)`` spends its time, per precision: the ops'
    self time against the start alone (``num_iterations=0``), so the iteration's ops stand out."""
    from torch.profiler import ProfilerActivity, profile

    from armor_modifier.core import SolverSettings, factorize

    W, H = make_problem(m, n, device, args.seed)
    settings = SolverSettings(max_wrapper_overhead=args.budget, wrapper_block_size=args.block)
    b = settings.block_size_for(m, n)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for precision in args.precisions:
        run = settings.replace(wrapper_block_size=b, matmul_precision=precision)
        totals = {}
        for iterations in (0, 1):
            with profile(activities=activities) as prof:
                factorize(W, H=H, settings=run, num_iterations=iterations)
                sync(device)
            totals[iterations] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        extra = {k: v - totals[0].get(k, 0.0) for k, v in totals[1].items()}
        top = sorted(extra.items(), key=lambda kv: -kv[1])[:15]
        print(f"\n{m}x{n} b={b} {precision}: one iteration's self time by op, "
              f"{sum(extra.values()):.2f} s in all")  # fmt: skip
        for key, seconds in top:
            print(f"  {seconds:8.3f} s  {key}")


def warm_up(device: Any) -> None:
    """First-call costs (CUDA context, cuSOLVER/cuBLAS handles) kept out of the timings."""
    from armor_modifier.core import factorize, sparsegpt_prune

    W, H = make_problem(64, 128, device, 123)
    sparsegpt_prune(W, H)
    factorize(W, H=H, wrapper_block_size=32, num_iterations=2)
    sync(device)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| shape | b | precision | SparseGPT s | 1 iter s | ratio | t1 - t0 s | SparseGPT err | "
        "ARMOR err (N it) | err / fp32 | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        versus = "-" if r["error_vs_float32"] is None else f"{r['error_vs_float32']:.4f}"
        lines.append(
            f"| {r['shape']} | {r['b']} | {r['matmul_precision']} | {r['sparsegpt_s']:.3f} | "
            f"{r['one_iteration_s']:.3f} | {r['ratio']:.3f} | {r['t1_minus_t0_s']:.3f} | "
            f"{r['sparsegpt_error']:.4f} | {r['armor_error']:.4f} ({r['iterations_run']}) | "
            f"{versus} | {r['peak_gib']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import torch  # after argument parsing: `--help` stays fast

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("layer_scaling.py: --device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    shapes = args.shapes or [
        parse_shape(s) for s in (CPU_DEFAULT if device.type == "cpu" else ALL_SHAPES)
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    meta = {
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iterations": args.iterations,
        "budget": args.budget,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }
    print(
        f"{name} | torch {torch.__version__} | {args.device} | threads {meta['threads']} | "
        f"{'/'.join(args.precisions)} | {args.iterations} iterations | budget {args.budget:g}",
        flush=True,
    )
    warm_up(device)
    if args.profile:
        for m, n in shapes:
            profile_shape(m, n, args, device)
        return
    rows: list[dict[str, Any]] = []
    for m, n in shapes:
        for row in bench_shape(m, n, args, device):
            rows.append(row)
            print(
                f"{row['shape']} {row['matmul_precision']}: b={row['b']} SparseGPT "
                f"{row['sparsegpt_s']:.3f} s, one iteration {row['one_iteration_s']:.3f} s "
                f"(x{row['ratio']:.2f}), error {row['sparsegpt_error']:.4f} -> "
                f"{row['armor_error']:.4f} after {row['iterations_run']}, peak "
                f"{row['peak_gib']:.2f} GiB",
                flush=True,
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
