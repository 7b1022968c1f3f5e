"""ONNX export of an ARMOR-pruned SmolLM2-135M: file sizes, onnxruntime speed, perplexity.

Takes an armor-ct checkpoint (``armor prune smollm2 --output out/smollm2-armor`` writes one),
exports it twice with ``armor export-onnx`` (factored: B, the 2:4 core, A per Linear; ``--fold``:
one dense matrix per Linear) and reports, in one run on one machine:

- the size of each ``model.onnx`` (and of the armor-ct weights, for reference), and that every
  factored core initializer is exactly 2:4;
- throughput in tokens per second of onnxruntime (CPU) against PyTorch eager (the armor-ct model
  with its wrapper hooks), with the same intra-op thread count: forward passes over ``--speed-
  windows`` windows of ``--seq-len`` tokens, and greedy generation of ``--new-tokens`` tokens
  with the key/value cache on both sides (PyTorch's speed without its cache is printed too);
- WikiVital (test) perplexity from onnxruntime and from PyTorch, which must agree to 3
  significant digits.

A Markdown table goes to stdout, one JSON line to ``--results``. Nothing here trains or prunes.

Usage::

    armor prune smollm2 --output out/smollm2-armor                  # once, if not done yet
    python benchmarks/smollm2_onnx.py out/smollm2-armor --out out/smollm2-onnx --threads 2
    python benchmarks/smollm2_onnx.py out/smollm2-armor --out out/smollm2-onnx --max-windows 40 \
        --results benchmarks/results/smollm2_onnx.jsonl

``--out`` gets ``factored/`` and ``folded/`` (replaced if present).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("armor_dir", type=Path, help="armor-ct checkpoint of SmolLM2-135M")
    p.add_argument("--out", type=Path, required=True, help="folder for factored/ and folded/")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity windows (all)")
    p.add_argument("--speed-windows", type=int, default=4, help="windows timed for speed")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens timed")
    p.add_argument("--results", type=Path, default=None, help="append one JSON line here")
    return p.parse_args()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _export(armor_dir: Path, out: Path, fold: bool, exporter: str) -> tuple[Path, float]:
    from armor_modifier.onnx import export_onnx

    start = time.perf_counter()
    folder = export_onnx(armor_dir, out, fold=fold, exporter=exporter)
    return folder, time.perf_counter() - start


def _cores_2of4(folder: Path) -> tuple[int, int]:
    """``(cores, cores that are not exactly 2:4)`` read back from ``model.onnx``."""
    from armor_modifier.core import count_broken_groups
    from armor_modifier.onnx import core_initializers

    info = json.loads((folder / "armor_onnx.json").read_text())
    cores = core_initializers(folder / "model.onnx", list(info["core_initializers"].values()))
    return len(cores), sum(count_broken_groups(torch.from_numpy(c)) != 0 for c in cores.values())


def _forward_speed(run, windows: torch.Tensor) -> float:
    """Tokens per second of ``run(window [1, L])`` over every window (one warm-up first)."""
    run(windows[:1])
    start = time.perf_counter()
    for row in windows:
        run(row[None])
    return windows.numel() / (time.perf_counter() - start)


def _generate_speed(generate, prompt: torch.Tensor, new: int) -> tuple[float, list[int]]:
    generate(prompt, 2)
    start = time.perf_counter()
    tokens = generate(prompt, new)
    return new / (time.perf_counter() - start), tokens


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import armor_modifier  # noqa: F401  (registers the armor-ct loader)
    from armor_harness import load_text, perplexity
    from armor_harness.perplexity import make_windows
    from armor_modifier.calibration import tokenize_text
    from armor_modifier.onnx import OnnxCausalLM, OnnxLogitsModule

    factored, factored_s = _export(args.armor_dir, args.out / "factored", False, args.exporter)
    folded, folded_s = _export(args.armor_dir, args.out / "folded", True, args.exporter)
    cores, broken = _cores_2of4(factored)

    model = AutoModelForCausalLM.from_pretrained(args.armor_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.armor_dir)
    runners = {
        "factored": OnnxCausalLM(factored, threads=args.threads),
        "folded": OnnxCausalLM(folded, threads=args.threads),
    }
    text = load_text("wikivital", "test")
    windows = make_windows(tokenize_text(tokenizer, text), args.seq_len, args.speed_windows)
    prompt = windows[:1, :32]

    def torch_forward(ids: torch.Tensor) -> None:
        with torch.no_grad():
            model(ids)

    def torch_generate(use_cache: bool):
        def run(ids: torch.Tensor, new: int) -> list[int]:
            with torch.no_grad():
                out = model.generate(
                    ids,
                    do_sample=False,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    use_cache=use_cache,
                    pad_token_id=tokenizer.eos_token_id,
                )
            return out[0, ids.shape[1] :].tolist()

        return run

    rows = {}
    speed_torch = _forward_speed(torch_forward, windows)
    gen_torch, tokens_torch = _generate_speed(torch_generate(True), prompt, args.new_tokens)
    gen_torch_no_cache, _ = _generate_speed(torch_generate(False), prompt, args.new_tokens)
    ppl_torch = perplexity(
        model, tokenizer, text, seq_len=args.seq_len, max_windows=args.max_windows
    ).ppl
    rows["pytorch eager (armor-ct)"] = {
        "bytes": sum(f.stat().st_size for f in args.armor_dir.glob("*.safetensors")),
        "forward_tok_s": speed_torch,
        "generate_tok_s": gen_torch,
        "generate_tok_s_without_cache": gen_torch_no_cache,
        "ppl": ppl_torch,
    }
    for form, runner in runners.items():

        def ort_generate(ids: torch.Tensor, new: int, runner=runner) -> list[int]:
            out = runner.generate(ids.numpy(), new, stop_at_eos=False)
            return out[0, ids.shape[1] :].tolist()

        speed = _forward_speed(lambda ids, runner=runner: runner.logits(ids.numpy()), windows)
        gen, tokens = _generate_speed(ort_generate, prompt, args.new_tokens)
        ppl = perplexity(
            OnnxLogitsModule(runner),
            tokenizer,
            text,
            seq_len=args.seq_len,
            max_windows=args.max_windows,
        ).ppl
        rows[f"onnxruntime {form}"] = {
            "bytes": (factored if form == "factored" else folded)
            .joinpath("model.onnx")
            .stat()
            .st_size,
            "folder_bytes": _size(factored if form == "factored" else folded),
            "forward_tok_s": speed,
            "generate_tok_s": gen,
            "forward_ratio_vs_pytorch": speed / speed_torch,
            "generate_ratio_vs_pytorch": gen / gen_torch,
            "ppl": ppl,
            "ppl_equal_3_sig": f"{ppl:.3g}" == f"{ppl_torch:.3g}",
            "greedy_equal_pytorch": tokens == tokens_torch,
        }

    print(
        "| model | MB | forward tok/s | greedy tok/s | ratio fwd / gen | WikiVital ppl |\n"
        "|---|---|---|---|---|---|"
    )
    for name, row in rows.items():
        ratio = (
            f"{row['forward_ratio_vs_pytorch']:.2f} / {row['generate_ratio_vs_pytorch']:.2f}"
            if "forward_ratio_vs_pytorch" in row
            else "1 / 1"
        )
        print(
            f"| {name} | {row['bytes'] / 1e6:.1f} | {row['forward_tok_s']:.0f} | "
            f"{row['generate_tok_s']:.1f} | {ratio} | {row['ppl']:.4g} |"
        )
    print(
        f"\nfactored cores exactly 2:4: {cores - broken}/{cores}; export seconds: factored "
        f"{factored_s:.1f}, folded {folded_s:.1f}; PyTorch greedy without its cache "
        f"{gen_torch_no_cache:.1f} tok/s"
    )
    record = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "seq_len": args.seq_len,
        "exporter": args.exporter,
        "cores": cores,
        "cores_not_2of4": broken,
        "export_s": [factored_s, folded_s],
        "rows": rows,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
