"""Prune a causal LM to 2:4 with ARMOR (``armor_modifier.prune``), save it as armor-ct, load it
back with ``from_pretrained`` and compare perplexity with the dense model.

Usage (SmolLM2-135M and the WikiVital text come from the benchmark harness, ``harness/``)::

    python examples/prune_and_load.py                                   # SmolLM2, out/example
    python examples/prune_and_load.py --model ./my-llama --output out/my-llama-armor \\
        --num-samples 128 --seq-len 2048 --quantize w4a16-gptq

Other settings (block size, objective, reconstruction...) are keyword arguments of ``prune``
(``docs/settings.md``).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="folder, hub id or 'smollm2'")
    parser.add_argument("--output", default="out/example", help="the armor-ct folder to write")
    parser.add_argument("--dataset", default="wikivital",
                        help="text: train split to calibrate, test split to evaluate")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--num-iterations", type=int, default=10, help="ARMOR iterations")
    parser.add_argument("--quantize", default="none", help="none, w4a16-gptq, fp8-dynamic, ...")
    parser.add_argument("--eval-windows", type=int, default=16, help="perplexity windows")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the solver's many small solves do not scale with threads

    from transformers import AutoModelForCausalLM

    from armor_harness import load_text, perplexity
    from armor_modifier import prune
    from armor_modifier.pruning import load_model_and_tokenizer

    test = load_text(args.dataset, "test")

    def ppl(model, tokenizer) -> float:
        return perplexity(model, tokenizer, test, seq_len=args.seq_len,
                          max_windows=args.eval_windows).ppl  # fmt: skip

    dense, tokenizer = load_model_and_tokenizer(args.model)
    print(f"dense        perplexity {ppl(dense, tokenizer):8.2f}", flush=True)
    del dense
    result = prune(args.model, args.output, overwrite=True, dataset=args.dataset,
                   num_samples=args.num_samples, seq_len=args.seq_len,
                   num_iterations=args.num_iterations, quantize=args.quantize)  # fmt: skip
    print(f"ARMOR 2:4    perplexity {ppl(result.model, tokenizer):8.2f} "
          f"({result.seconds:.0f} s to prune)", flush=True)  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32)
    print(f"reloaded     perplexity {ppl(reloaded, tokenizer):8.2f} (from {result.output})")


if __name__ == "__main__":
    main()
