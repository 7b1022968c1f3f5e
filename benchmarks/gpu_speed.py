"""GPU speed of the 2:4 runtime on Llama-3-8B Linear shapes: dense vs plain 2:4 vs ARMOR.

For every projection of a Llama-3-8B decoder layer (q 4096x4096, k/v 1024x4096, o 4096x4096,
gate/up 14336x4096, down 4096x14336) and every token count, times in bf16:

- ``dense``: ``F.linear`` with the dense weight;
- ``2:4``: the same core as a semi-structured sparse tensor (no wrappers);
- ``ARMOR b``: an ARMOR Linear after :func:`armor_modifier.cuda.to_semi_structured`, i.e. the 2:4
  core plus the ``B`` / ``A`` block products of size ``b`` (the hooks the runtime uses);

each as the median over ``--reps`` CUDA-event measurements of ``--inner`` back-to-back calls, after
warm-up. Prints one table per token count (ms of dense, then speed-ups ``dense / variant``) and the
whole layer (sum of its 7 projections). Also checks each ARMOR output against the dense-core hooks.

Needs one CUDA GPU with compute capability >= 8.0 (written for an H100/H200; about a minute there).

Usage: ``python benchmarks/gpu_speed.py [--tokens 1 16 256 2048] [--blocks 128 64]
[--backend cusparselt|cutlass] [--reps 30] [--inner 10] [--json results.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

from armor_modifier.core import identity_blocks, top2_of_4_mask
from armor_modifier.cuda import semi_structured_problem, to_semi_structured
from armor_modifier.runtime import attach_wrappers

SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def median_ms(fn: Callable[[], object], reps: int, inner: int, warmup: int = 10) -> float:
    """Median over ``reps`` of (CUDA-event time of ``inner`` calls) / ``inner``, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def bind(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: module(x)


def make_linears(m: int, n: int, blocks: list[int], backend: str) -> dict[str, nn.Module]:
    """Dense, plain 2:4 and ARMOR Linears sharing one random bf16 2:4 core ``[m, n]``."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    core = torch.randn(m, n, device=device) * top2_of_4_mask(torch.rand(m, n, device=device))
    dense = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(core)
    plain = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
    plain.weight = nn.Parameter(
        torch.sparse.to_sparse_semi_structured(dense.weight.detach())
        if backend == "cusparselt"
        else torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(dense.weight.detach()),
        requires_grad=False,
    )
    linears: dict[str, nn.Module] = {"dense": dense, "2:4": plain}
    for b in blocks:
        armor = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            armor.weight.copy_(core)
        A = identity_blocks(m // b, b, device=device) + 0.02 * torch.randn(
            m // b, b, b, device=device
        )
        B = identity_blocks(n // b, b, device=device) + 0.02 * torch.randn(
            n // b, b, b, device=device
        )
        attach_wrappers(armor, A, B)
        reference = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            reference.weight.copy_(core)
        attach_wrappers(reference, A, B)
        to_semi_structured(armor, backend=backend)
        linears[f"ARMOR b={b}"] = armor
        linears[f"_ref b={b}"] = reference
    return linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--backend", choices=["cusparselt", "cutlass"], default=None)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the raw timings here")
    args = parser.parse_args()

    problem = semi_structured_problem()
    if problem:
        sys.exit(f"gpu_speed.py cannot run here: {problem}")
    backend = args.backend or (
        "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    )
    cusparselt = (
        torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    )
    print(
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} "
        f"| cuSPARSELt {cusparselt} | backend {backend} | bf16 | median of {args.reps} x "
        f"{args.inner} calls | {platform.node()}"
    )
    torch.manual_seed(0)
    variants = ["dense", "2:4"] + [f"ARMOR b={b}" for b in args.blocks]
    results: dict[str, dict[int, dict[str, float]]] = {}
    errors: dict[str, float] = {}
    for name, (m, n) in SHAPES.items():
        with torch.no_grad():
            linears = make_linears(m, n, args.blocks, backend)
        results[name] = {}
        with torch.inference_mode():
            for tokens in args.tokens:
                x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
                results[name][tokens] = {
                    v: median_ms(bind(linears[v], x), args.reps, args.inner) for v in variants
                }
            for b in args.blocks:
                got = linears[f"ARMOR b={b}"](x).float()
                want = linears[f"_ref b={b}"](x).float()
                errors[f"{name} b={b}"] = float((got - want).abs().max() / want.abs().max())
        del linears
        torch.cuda.empty_cache()

    header = (
        "| projection | m x n | dense ms | " + " | ".join(f"{v} x" for v in variants[1:]) + " |"
    )
    rule = "|---" * (3 + len(variants) - 1) + "|"
    for tokens in args.tokens:
        print(f"\ntokens = {tokens} (speed-up = dense ms / variant ms; > 1 is faster)\n")
        print(header)
        print(rule)
        for name, (m, n) in SHAPES.items():
            row = results[name][tokens]
            ratios = " | ".join(f"{row['dense'] / row[v]:.2f}" for v in variants[1:])
            print(f"| {name} | {m}x{n} | {row['dense']:.4f} | {ratios} |")
        total = {v: sum(results[name][tokens][v] for name in SHAPES) for v in variants}
        ratios = " | ".join(f"{total['dense'] / total[v]:.2f}" for v in variants[1:])
        print(f"| **layer** | {len(SHAPES)} projections | {total['dense']:.4f} | {ratios} |")
    worst = max(errors.values())
    print(f"\nmax relative error of ARMOR 2:4 vs the dense-core hooks: {worst:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "errors": errors, "backend": backend}, f, indent=2)


if __name__ == "__main__":
    main()
