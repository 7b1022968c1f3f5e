"""Prune SmolLM2-135M-Instruct to 2:4 with ARMOR through llm-compressor's ``oneshot``.

Compares, on the same calibration set (WikiVital train, 16 windows x 512 tokens by default) and
the same evaluation (WikiVital test perplexity, 16 windows of 512 tokens):

- ``dense``: the unpruned model;
- ``sparsegpt``: llm-compressor's own ``SparseGPTModifier`` 2:4;
- ``armor-sequential`` / ``armor-dense``: ``ARMORModifier`` with ``calibration="sequential"``
  (statistics from the already-pruned earlier layers) or ``"dense"`` (the paper's: from the
  unpruned model).

lm_head (tied to the embeddings) is ignored by every method. Each method starts from a fresh copy
of the cached checkpoint. Offline; CPU is fine (``--threads 1`` is fastest on a busy 2-core
machine: the solver's many small solves do not scale with threads).

Usage (the default methods, dense + SparseGPT + ARMOR, take about 16 minutes on 2 CPU cores)::

    python examples/prune_smollm2_oneshot.py --measure-layer          # seconds per iteration
    python examples/prune_smollm2_oneshot.py --json /tmp/smollm2_2of4.json
    python examples/prune_smollm2_oneshot.py --methods armor-sequential armor-dense --seed 1

Measured on a shared 2-core CPU (20 iterations, b=96 as 128 does not divide 576; perplexity and
prune seconds): dense 14.17; SparseGPT 2:4 54.06 (132 s); ARMOR 2:4, seed 0, one 4-group per tile
in the discrete step: sequential 31.30 (324 s), dense 30.54 (433 s); seed 1, 64 groups per tile
(the current default): sequential 28.76 (1157 s, busy machine), dense 28.15 (678 s).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = ("dense", "sparsegpt", "armor-sequential", "armor-dense")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=["dense", "sparsegpt", "armor-dense"]
    )
    parser.add_argument("--num-iterations", type=int, default=20, help="ARMOR BCD iterations")
    parser.add_argument("--wrapper-block-size", type=int, default=128)
    parser.add_argument("--update-mode", choices=("exact", "adam"), default="exact")
    parser.add_argument(
        "--groups-per-tile",
        type=int,
        help="groups per tile in the discrete step (default: the modifier's)",
    )
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results table here")
    parser.add_argument(
        "--measure-layer",
        action="store_true",
        help="only time ARMOR iterations on the Linears of decoder layer 0 and exit",
    )
    return parser.parse_args()


def recipe_for(method: str, args: argparse.Namespace) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    from armor_modifier.modifier import ARMORModifier

    if method == "sparsegpt":
        return [
            SparseGPTModifier(
                sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"]
            )
        ]
    optional = {} if args.groups_per_tile is None else {"groups_per_tile": args.groups_per_tile}
    return [
        ARMORModifier(
            targets=["Linear"],
            ignore=["re:.*lm_head"],
            wrapper_block_size=args.wrapper_block_size,
            num_iterations=args.num_iterations,
            update_mode=args.update_mode,
            objective="proxy",  # the paper's objective; compares its two calibration sources
            calibration=method.removeprefix("armor-"),
            seed=args.seed,
            **optional,
        )
    ]


def measure_layer(args: argparse.Namespace) -> None:
    """Seconds per ARMOR iteration for each Linear of layer 0 (dense-model statistics)."""
    from armor_harness import calibration_samples, load_default_model, wikivital_split
    from armor_modifier.core import factorize

    model, tokenizer, _ = load_default_model()
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    sums = {n: torch.zeros(m.in_features) for n, m in linears.items()}

    def accumulate(module: torch.nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        sums[names[module]].add_(x.square().sum(0))

    names = {m: n for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(accumulate) for m in linears.values()]
    data = calibration_samples(tokenizer, wikivital_split("train"), 4, args.seq_len, args.seed)
    with torch.no_grad():
        model(torch.tensor(data["input_ids"]))
    for handle in handles:
        handle.remove()
    total = 0.0
    for name, linear in linears.items():
        f = factorize(linear.weight, sums[name], wrapper_block_size=args.wrapper_block_size,
                      num_iterations=5, update_mode=args.update_mode,
                      objective="proxy")  # fmt: skip
        per_iteration = f.seconds / max(1, len(f.loss_history) - 1)
        total += per_iteration
        print(f"{name:18s} {tuple(linear.weight.shape)} b={f.wrapper_block_size}: "
              f"{per_iteration:.3f} s/iteration")  # fmt: skip
    layers = model.config.num_hidden_layers
    print(f"layer 0: {total:.2f} s/iteration; whole model ~{total * layers:.0f} s/iteration")


def run_method(method: str, args: argparse.Namespace, calibration, test_text: str) -> dict:
    from llmcompressor import oneshot

    from armor_harness import load_default_model, perplexity

    model, tokenizer, path = load_default_model()
    start = time.perf_counter()
    extra = {}
    if method != "dense":
        recipe = recipe_for(method, args)
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=calibration,
            recipe=recipe,
            num_calibration_samples=len(calibration),
            max_seq_length=args.seq_len,
            shuffle_calibration_samples=False,
        )
        if method.startswith("armor"):
            results = recipe[0].results.values()
            extra = {
                "mean_loss_ratio": sum(r.loss_ratio for r in results) / len(results),
                "solver_seconds": sum(r.seconds for r in results),
                "modules": len(results),
            }
    prune_seconds = time.perf_counter() - start
    ppl = perplexity(
        model, tokenizer, test_text, seq_len=args.seq_len, max_windows=args.eval_windows
    )
    row = {
        "method": method,
        "ppl": ppl.ppl,
        "prune_seconds": prune_seconds,
        "eval_seconds": ppl.seconds,
        **extra,
    }
    print(f"RESULT {json.dumps(row)}", flush=True)
    return row


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.measure_layer:
        measure_layer(args)
        return

    import armor_modifier.modifier  # noqa: F401  (registers ARMORModifier)
    from armor_harness import calibration_samples, load_default_model, wikivital_split

    _, tokenizer, _ = load_default_model()
    calibration = calibration_samples(
        tokenizer, wikivital_split("train"), args.num_samples, args.seq_len, args.seed
    )
    test_text = wikivital_split("test")
    rows = [run_method(method, args, calibration, test_text) for method in args.methods]

    print(f"\nWikiVital test perplexity, {args.eval_windows} windows x {args.seq_len} tokens; "
          f"calibration {args.num_samples} x {args.seq_len} WikiVital train tokens")  # fmt: skip
    print(f"{'method':18s} {'ppl':>9s} {'prune s':>9s} {'eval s':>8s}")
    for row in rows:
        print(f"{row['method']:18s} {row['ppl']:9.2f} {row['prune_seconds']:9.1f} "
              f"{row['eval_seconds']:8.1f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
