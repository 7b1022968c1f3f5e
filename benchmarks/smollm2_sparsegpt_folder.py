"""Write llm-compressor's SparseGPT 2:4 of a benchmark model as a plain checkpoint.

The baseline row of the zero-shot table (``docs/results.md#zeroshot``): the same calibration as
``armor prune MODEL`` (``--model``: ``smollm2``, SmolLM2-135M-Instruct, the default, or
``qwen2.5-coder-0.5b``; ``--num-samples`` windows of ``--seq-len`` WikiVital-train tokens, seed 0),
``SparseGPTModifier(sparsity=0.5, mask_structure="2:4")`` on every Linear but ``lm_head``, saved
dense (zeros stored as zeros) so that any tool loads it, then evaluated like the other folders with
``armor eval``.

Usage::

    python benchmarks/smollm2_sparsegpt_folder.py --output out/smollm2-sparsegpt
    python benchmarks/smollm2_sparsegpt_folder.py --model qwen2.5-coder-0.5b --output out/qwen-sgpt
"""

from __future__ import annotations

import argparse
import time

import torch

from armor_modifier.calibration import BENCHMARK_MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write (must not exist)")
    parser.add_argument("--model", default="smollm2", choices=BENCHMARK_MODELS,
                        help="benchmark model (default smollm2)")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0, help="window sampling seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    from armor_harness import calibration_samples, load_text
    from armor_harness.models import load_benchmark_model
    from armor_modifier.staging import staged_replace

    model, tokenizer, _ = load_benchmark_model(args.model)
    text = load_text("wikivital", "train")
    dataset = calibration_samples(tokenizer, text, args.num_samples, args.seq_len, seed=args.seed)
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset,
            recipe=[SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"],
                                      ignore=["re:.*lm_head"])],
            num_calibration_samples=args.num_samples, max_seq_length=args.seq_len,
            shuffle_calibration_samples=False)  # the windows are drawn with --seed already
    seconds = time.perf_counter() - start
    with staged_replace(args.output) as stage:
        model.save_pretrained(stage, save_compressed=False)
        tokenizer.save_pretrained(stage)
    print(f"SparseGPT 2:4 in {seconds:.1f} s; wrote {args.output}")


if __name__ == "__main__":
    main()
