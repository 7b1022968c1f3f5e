"""Output-aware ARMOR on real SmolLM2-135M layers (docs/algorithm.md):
a quick check.

For each chosen Linear of one decoder layer of SmolLM2-135M-Instruct (Q4_1), with the inputs ``X``
of ``--samples`` x ``--seq-len`` WikiVital-train tokens (``H = X^T X / N``), print the relative
output error ``||(W_hat - W) X^T||^2 / ||W X^T||^2`` of

- NoWag-P and SparseGPT 2:4 (this package's ``sparsegpt_2of4``, equal to llm-compressor's),
- ARMOR on the paper's proxy (exact updates, from NoWag-P),
- ARMOR on the output error, from SparseGPT (and from NoWag-P), with and without mask updates,
  and with the ``output_damping`` ridge,

on the calibration tokens ("calib") and on as many held-out WikiVital-valid tokens ("valid", an
``H`` the solver never saw), with seconds per iteration (wall and process CPU time).

Usage::

    python benchmarks/output_layer_check.py [--layer 10] [--modules mlp.gate_proj ...]
        [--block 64] [--samples 8] [--seq-len 512] [--output-damping 0.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from armor_harness import calibration_samples, load_default_model, wikivital_split
from armor_modifier.core import factorize, nowag_p, output_loss, sparsegpt_2of4


def layer_hessians(model, tok, layer: int, modules: list[str], split: str, args) -> dict:
    """``H = X^T X / N`` (float32) of each module's input on ``split`` windows."""
    data = calibration_samples(tok, wikivital_split(split), args.samples, args.seq_len, seed=0)
    block = model.model.layers[layer]
    H = {t: 0.0 for t in modules}
    count = {"tokens": 0}

    def hook(name):
        def accumulate(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            H[name] = H[name] + x.T @ x

        return accumulate

    handles = [block.get_submodule(t).register_forward_pre_hook(hook(t)) for t in modules]
    with torch.inference_mode():
        for row in data:
            model(torch.tensor([row["input_ids"]]))
            count["tokens"] += len(row["input_ids"])
    for handle in handles:
        handle.remove()
    return {t: H[t] / count["tokens"] for t in modules}


def run(W, h, H, **kwargs):
    """``factorize`` with wall and CPU seconds per iteration."""
    wall, cpu = time.perf_counter(), time.process_time()
    f = factorize(W, h, H=H, patience=10**6, **kwargs)
    iterations = max(1, len(f.loss_history) - 1)
    return f, (time.perf_counter() - wall) / iterations, (time.process_time() - cpu) / iterations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--modules", nargs="+", default=["mlp.gate_proj"])
    ap.add_argument("--block", type=int, default=64, help="wrapper block size")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--proxy-iterations", type=int, default=50)
    ap.add_argument("--output-iterations", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--output-damping", type=float, nargs="*", default=[0.1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok, _ = load_default_model()
    calib = layer_hessians(model, tok, args.layer, args.modules, "train", args)
    valid = layer_hessians(model, tok, args.layer, args.modules, "valid", args)
    print(
        f"SmolLM2-135M-Instruct (Q4_1), layer {args.layer}; {args.samples}x{args.seq_len} tokens "
        f"WikiVital train (calib) / valid (held out); wrapper block {args.block}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s)."
    )
    print("| module | method | calib | valid | s/it wall | s/it cpu |")
    print("|---|---|---|---|---|---|")
    for name in args.modules:
        W = model.model.layers[args.layer].get_submodule(name).weight.detach().float()
        H, Hv = calib[name], valid[name]
        h = H.diagonal()

        def row(method, W_hat, wall=None, cpu=None, name=name, H=H, Hv=Hv, W=W):
            times = "- | -" if wall is None else f"{wall:.3f} | {cpu:.3f}"
            print(
                f"| {name} | {method} | {output_loss(W, H, W_hat):.4f} | "
                f"{output_loss(W, Hv, W_hat):.4f} | {times} |",
                flush=True,
            )

        row("NoWag-P", nowag_p(W, h))
        start = time.perf_counter()
        row("SparseGPT", sparsegpt_2of4(W, H)[0])
        print(f"|  | (SparseGPT took {time.perf_counter() - start:.2f} s) | | | | |")
        common = dict(wrapper_block_size=args.block)
        f, wall, cpu = run(
            W, h, None, num_iterations=args.proxy_iterations, objective="proxy", **common
        )
        row(f"ARMOR proxy, exact, {args.proxy_iterations} it", f.dense(), wall, cpu)
        variants = [("sparsegpt", False, 0.0), ("sparsegpt", True, 0.0), ("nowag", True, 0.0)]
        variants += [("sparsegpt", True, damping) for damping in args.output_damping]
        for k in args.output_iterations:
            for init, update_mask, damping in variants:
                f, wall, cpu = run(
                    W,
                    h,
                    H,
                    objective="output",
                    init=init,
                    num_iterations=k,
                    update_mask=update_mask,
                    output_damping=damping,
                    **common,
                )
                mask = "mask updates" if update_mask else "mask fixed"
                ridge = f", output_damping {damping:g}" if damping else ""
                row(f"ARMOR output from {init}, {k} it, {mask}{ridge}", f.dense(), wall, cpu)


if __name__ == "__main__":
    main()
