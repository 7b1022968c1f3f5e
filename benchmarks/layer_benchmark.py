"""Layer benchmark: ARMOR vs NoWag-P, Wanda and SparseGPT 2:4 on real SmolLM2-135M layers.

For every Linear type of one decoder layer (q, k, v, o, gate, up, down) of SmolLM2-135M-Instruct
(Q4_1), with real inputs from WikiVital train text, print:

- the NoWag proxy loss (relative) of NoWag-P, Wanda, SparseGPT and ARMOR (both modes, several
  iteration budgets),
- the true relative output error ``||(W_hat - W) X^T||^2 / ||W X^T||^2`` of each,
- ARMOR's seconds per iteration (paper proxy in both modes, and the output-aware objective of
  docs/algorithm.md's output objective, started from SparseGPT);

then, on one layer, the speed target: the wall time exact mode needs to reach the proxy loss that
adam mode reaches after ``--adam-iterations`` iterations, as a ratio measured in the same run; and a
PNG of loss vs iteration and vs seconds for both modes.

Wanda and SparseGPT are llm-compressor's own ``sparsify_weight`` functions on the same inputs.

Usage: ``python benchmarks/layer_benchmark.py [--layer 10] [--samples 8] [--seq-len 512]``
writes ``--out``.md and .png (default ``benchmarks/results/layer_benchmark``). Published figures
live in ``docs/results/layer_benchmark.json``, rendered into docs/results.md by
``benchmarks/results_doc.py``; the plot linked there is docs/layer_benchmark.png.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import torch

from armor_harness import calibration_samples, load_default_model, wikivital_split
from armor_modifier import factorize
from armor_modifier.core import nowag_p, proxy_loss

TYPES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def collect_inputs(model, dataset, layer: int) -> dict[str, torch.Tensor]:
    """Inputs ``X [tokens, n]`` (fp32) of every Linear of decoder layer ``layer``."""
    block = model.model.layers[layer]
    inputs: dict[str, list[torch.Tensor]] = {t: [] for t in TYPES}
    handles = [
        block.get_submodule(t).register_forward_pre_hook(
            lambda _m, args, t=t: inputs[t].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for t in TYPES
    ]
    with torch.inference_mode():
        for row in dataset:
            model(torch.tensor([row["input_ids"]]))
    for hnd in handles:
        hnd.remove()
    return {t: torch.cat(x).float() for t, x in inputs.items()}


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)`` with ``H = X^T X / N``: relative output error."""
    E = W_hat - W
    return float(((E @ H) * E).sum() / ((W @ H) * W).sum())


def wanda(W: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import sparsify_weight

    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    return sparsify_weight(lin, {lin: h.clone()}, 0.5, 2, 4).float()


def sparsegpt(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    _, pruned = sparsify_weight(lin, {lin: 2 * H.clone()}, 0.5, 2, 4, 128, 0.01, False)
    return pruned.float()


def timed_run(W, h, mode: str, iterations: int, block: int, lr: float):
    trace: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    f = factorize(
        W,
        h,
        wrapper_block_size=block,
        num_iterations=iterations,
        update_mode=mode,
        learning_rate=lr,
        patience=iterations + 1,
        callback=lambda k, loss: trace.append((k, time.perf_counter() - start, loss)),
        objective="proxy",
    )
    return f, trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--samples", type=int, default=8, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--block", type=int, default=64, help="wrapper block size")
    ap.add_argument("--exact-iterations", type=int, nargs="+", default=[25, 100, 300])
    ap.add_argument(
        "--output-iterations",
        type=int,
        nargs="*",
        default=[10, 50],
        help="iterations of the output-aware objective (from SparseGPT)",
    )
    ap.add_argument("--adam-iterations", type=int, default=2000)
    ap.add_argument("--adam-lr", type=float, default=1e-4)
    ap.add_argument("--speed-layer", default="mlp.gate_proj")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/layer_benchmark"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok, _ = load_default_model()
    data = calibration_samples(tok, wikivital_split("train"), args.samples, args.seq_len, seed=0)
    X = collect_inputs(model, data, args.layer)
    lines = [
        f"# Layer benchmark: SmolLM2-135M-Instruct (Q4_1), layer {args.layer}",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {args.threads} thread(s); calibration {args.samples}x{args.seq_len}"
        f" WikiVital-train tokens; wrapper block {args.block} requested.",
        "Columns: proxy = NoWag's relative proxy loss; out = relative output error "
        "||(W_hat - W) X^T||^2 / ||W X^T||^2; s/it = ARMOR seconds per iteration.",
        "",
        "| layer | shape | b | method | proxy | out | s/it |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    traces = {}
    for t in TYPES:
        W = model.model.layers[args.layer].get_submodule(t).weight.detach().float()
        Xt = X[t]
        h = Xt.square().mean(0)
        H = Xt.T @ Xt / Xt.shape[0]
        shape = f"{W.shape[0]}x{W.shape[1]}"
        rows = [
            ("NoWag-P", nowag_p(W, h), None, None),
            ("Wanda", wanda(W, h), None, None),
            ("SparseGPT", sparsegpt(W, H), None, None),
        ]
        for k in args.exact_iterations:
            f, tr = timed_run(W, h, "exact", k, args.block, args.adam_lr)
            rows.append((f"ARMOR exact {k} it", f.dense(), f.seconds / max(1, len(tr)), f))
            if t == args.speed_layer and k == max(args.exact_iterations):
                traces["exact"] = tr
        for k in args.output_iterations:
            f = factorize(
                W,
                h,
                wrapper_block_size=args.block,
                num_iterations=k,
                objective="output",
                output_damping=0.0,  # as in docs/results.md#layer_benchmark (no ridge)
                H=H,
                patience=k + 1,
            )
            spi = f.seconds / max(1, len(f.loss_history) - 1)
            rows.append((f"ARMOR output {k} it", f.dense(), spi, f))
        adam_k = args.adam_iterations if t == args.speed_layer else min(200, args.adam_iterations)
        f, tr = timed_run(W, h, "adam", adam_k, args.block, args.adam_lr)
        rows.append((f"ARMOR adam {adam_k} it", f.dense(), f.seconds / max(1, len(tr)), f))
        if t == args.speed_layer:
            traces["adam"] = tr
        for name, W_hat, spi, f in rows:
            b = str(f.wrapper_block_size) if f is not None else "-"
            line = (
                f"| {t} | {shape} | {b} | {name} | {proxy_loss(W, h, W_hat):.4f} | "
                f"{output_error(W, W_hat, H):.4f} | {'-' if spi is None else f'{spi:.3f}'} |"
            )
            print(line, flush=True)
            lines.append(line)

    lines += ["", *speed_summary(traces, args)]
    print("\n".join(lines[-4:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(traces, args.out.with_suffix(".png"), args.speed_layer)


def speed_summary(traces, args) -> list[str]:
    adam, exact = traces["adam"], traces["exact"]
    target, adam_seconds = adam[-1][2], adam[-1][1]
    adam_best = min(loss for _, _, loss in adam)
    reached = [(k, s) for k, s, loss in exact if loss <= adam_best]
    head = (
        f"Speed target on {args.speed_layer}: adam reaches proxy {adam_best:.4f} (last "
        f"{target:.4f}) after {len(adam)} iterations in {adam_seconds:.1f} s."
    )
    if not reached:
        return [
            head,
            f"exact did not reach it within {len(exact)} iterations "
            f"({exact[-1][1]:.1f} s, best {min(x[2] for x in exact):.4f}).",
        ]
    k, s = reached[0]
    return [
        head,
        f"exact reaches it at iteration {k} after {s:.2f} s: "
        f"{s / adam_seconds:.3f} of adam's wall time (target <= 0.2).",
    ]


def plot(traces, path: Path, layer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, tr in traces.items():
        ax1.plot([k for k, _, _ in tr], [x for _, _, x in tr], label=mode)
        ax2.plot([s for _, s, _ in tr], [x for _, _, x in tr], label=mode)
    for ax, xlabel in ((ax1, "iteration"), (ax2, "seconds")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative proxy loss")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"ARMOR on SmolLM2-135M {layer}: exact vs adam")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
