"""Model-level distillation of a saved ARMOR model (the logit-level lever of the accuracy work).

Loads an armor-ct folder, records the dense model's output-head inputs on calibration windows
(``armor_modifier.modifier.distillation.teacher_states``), fits every ARMOR Linear's wrappers and
kept core values to the dense next-token distributions (``distill_model``: KL, masks frozen, guard
windows held out) and saves the result as armor-ct. Evaluate it with ``armor eval`` like any other
folder; ``docs/results.md#zeroshot_levers`` has the rows and the commands.

Usage::

    python benchmarks/distill_armor.py --armor out/armor-it10 --output out/armor-it10-kl \\
        --num-samples 64 --steps 100 --learning-rate 1e-5 --precision bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--armor", required=True, help="the armor-ct folder to refine")
    parser.add_argument("--output", required=True, help="folder for the refined armor-ct")
    parser.add_argument("--dense", default="smollm2", help="the dense model (folder or 'smollm2')")
    parser.add_argument("--dataset", default="wikivital",
                        help="calibration text(s), as armor prune's --dataset")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0, help="window sampling and order seed")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="Adam learning rate")
    parser.add_argument("--windows-per-step", type=int, default=1, help="windows per Adam step")
    parser.add_argument(
        "--parameters", default="all", choices=["all", "wrappers", "core", "wrappers+scales"]
    )
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--eval-every", type=int, default=20, help="steps between guard checks")
    parser.add_argument("--guard-fraction", type=float, default=0.125, help="windows held out")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from armor_modifier.calibration import calibration_samples, load_text, split_sources
    from armor_modifier.core.distill_settings import DistillationSettings
    from armor_modifier.modifier.distillation import distill_model, teacher_states
    from armor_modifier.pruning import load_model_and_tokenizer

    settings = DistillationSettings(
        steps=args.steps, num_samples=args.num_samples, learning_rate=args.learning_rate,
        windows_per_step=args.windows_per_step, parameters=args.parameters,
        guard_fraction=args.guard_fraction, eval_every=args.eval_every,
        precision=args.precision, seed=args.seed,
    )  # fmt: skip
    dense, tokenizer = load_model_and_tokenizer(args.dense)
    texts = [load_text(part, "train") for part in split_sources(args.dataset)]
    rows = calibration_samples(tokenizer, texts, args.num_samples, args.seq_len,
                               seed=args.seed)["input_ids"]  # fmt: skip
    windows = [torch.tensor(row, dtype=torch.long).unsqueeze(0) for row in rows]
    start = time.perf_counter()
    states = teacher_states(dense, windows)
    teacher_seconds = time.perf_counter() - start
    del dense
    model = AutoModelForCausalLM.from_pretrained(args.armor, dtype=torch.float32)
    bar = tqdm(total=args.steps, desc="distillation")
    result = distill_model(model, windows, states, settings,
                           progress=lambda step, loss: bar.update(1))  # fmt: skip
    bar.close()
    from transformers import AutoTokenizer

    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(args.armor).save_pretrained(args.output)
    summary = {
        "armor": args.armor, "output": args.output, "settings": vars(args),
        "teacher_seconds": round(teacher_seconds, 1), "fit_seconds": round(result.seconds, 1),
        "guard_kl_before": result.initial_error, "guard_kl_after": result.final_error,
        "best_step": result.best_step, "steps_run": result.steps_run,
        "accepted": result.accepted, "history": result.history,
    }  # fmt: skip
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
