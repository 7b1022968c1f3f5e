"""llm-compressor ``oneshot`` on a SmolLM2-135M-shaped model: SparseGPT 2:4 vs ARMOR, timed.

Everything is built on the machine that runs it (no model, tokenizer or data set travels): a
random-weight Llama shaped like SmolLM2-135M (hidden 576, intermediate 1536, ``--layers`` decoder
layers (30 in the real model), 9 heads, 3 key/value heads, vocab 49152, tied embeddings), saved
to a temporary folder with an offline word-level tokenizer (``oneshot`` re-reads the config from
``name_or_path``), and ``--samples`` random token windows of ``--seq-len`` as calibration data.

Then, each from a fresh load of that folder, with the model on ``--device``, timed:

1. ``sparsegpt``: llm-compressor's ``SparseGPTModifier(sparsity=0.5, mask_structure="2:4")``;
2. ``armor``: ``ARMORModifier(wrapper_block_size=32, num_iterations=10)``;
3. ``armor+rec``: the same plus ``reconstruction_steps=20``.

After each, every pruned Linear's weight must be exactly 2:4. After ``armor`` (before the slower
``armor+rec``, so a time-out keeps it) the model is cast to bf16 and its logits on fixed inputs
are compared before and after :func:`armor_modifier.cuda.to_semi_structured`, against the fp32
reference of the same rounded parameters (``tests/test_cuda.py``'s bound: twice the dense bf16
error plus one bf16 ulp of the largest logit); a forward pass is timed both ways. On CPU that
step is skipped with the runtime's own message. The JSON is rewritten after every step.

Usage: ``python benchmarks/gpu_oneshot.py [--layers 30] [--samples 32] [--seq-len 256]
[--device cuda] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

VOCAB = 49152
VARIANTS = ("sparsegpt", "armor", "armor+rec")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2: 30)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--num-iterations", type=int, default=10)
    parser.add_argument("--wrapper-block-size", type=int, default=32)
    parser.add_argument("--reconstruction-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (after every step)")
    return parser


def build_tokenizer():
    """A word-level tokenizer over ``<pad> <bos> <eos> <unk> w4 ... w49151`` (offline)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    tokenizer = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def save_model(folder: Path, layers: int, seed: int) -> None:
    """A random SmolLM2-135M-shaped Llama (fp32) and its tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


def calibration(samples: int, seq_len: int, seed: int):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(4, VOCAB, (samples, seq_len), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


def recipe(variant: str, args: argparse.Namespace) -> list:
    common = {"targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if variant == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", **common)]
    from armor_modifier.modifier import ARMORModifier

    steps = args.reconstruction_steps if variant == "armor+rec" else 0  # `armor`: per Linear
    extra = {"reconstruction_steps": steps}
    return [
        ARMORModifier(
            wrapper_block_size=args.wrapper_block_size,
            num_iterations=args.num_iterations,
            **common,
            **extra,
        )
    ]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pruned_linears(model) -> dict[str, Any]:
    from torch import nn

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    }


def run_variant(variant: str, folder: Path, dataset, args, device) -> tuple[Any, dict[str, Any]]:
    """Fresh load, ``oneshot`` with the variant's recipe, timed; the 2:4 check of every core."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from transformers import AutoModelForCausalLM

    from armor_modifier.core import count_broken_groups

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    mods = recipe(variant, args)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=build_tokenizer(),
        dataset=dataset,
        recipe=mods,
        num_calibration_samples=len(dataset),
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
    )
    sync(device)
    seconds = time.perf_counter() - start
    reset_session()
    linears = pruned_linears(model)
    broken = {}
    with torch.no_grad():
        for name, module in linears.items():
            count = int(count_broken_groups(module.weight.detach().float()))
            if count:
                broken[name] = count
    row: dict[str, Any] = {
        "seconds": seconds,
        "linears": len(linears),
        "all_2of4": not broken,
        "broken_groups": broken,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }
    results = getattr(mods[0], "results", None)
    if results:
        gains = [r.final_loss / r.initial_loss for r in results.values() if r.initial_loss > 0]
        row["armor_modules"] = len(results)
        row["median_final_over_initial"] = statistics.median(gains) if gains else None
        row["solver_seconds"] = sum(r.seconds for r in results.values())
    return model, row


def logits(model, ids) -> Any:
    import torch

    with torch.no_grad():
        return model(ids).logits.float()


def forward_ms(model, ids, reps: int = 10) -> float:
    """Median CUDA-event time of one forward pass, in ms (after 3 warm-up passes)."""
    import torch

    with torch.no_grad():
        for _ in range(3):
            model(ids)
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            model(ids)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def semi_structured_check(model, device, seed: int) -> dict[str, Any]:
    """bf16 logits before / after ``to_semi_structured`` vs the fp32 reference of the same
    rounded parameters (the bound of ``tests/test_cuda.py``)."""
    import copy

    import torch
    from compressed_tensors.offload import remove_dispatch

    from armor_modifier.cuda import ARMORRuntimeError, to_dense, to_semi_structured

    remove_dispatch(model, onload_tensors=True)  # oneshot leaves compressed-tensors' offloading
    model.to(device=device, dtype=torch.bfloat16)
    exact_model = copy.deepcopy(model).float()  # fp32 reference of the rounded bf16 parameters
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(4, VOCAB, (2, 128), generator=g).to(device)
    exact = logits(exact_model, ids)
    del exact_model
    dense = logits(model, ids)
    out: dict[str, Any] = {"dense_bf16_error": float((dense - exact).abs().max())}
    bench_ids = torch.randint(4, VOCAB, (8, 512), generator=g).to(device)
    if device.type == "cuda":
        out["dense_forward_ms"] = forward_ms(model, bench_ids)
    try:
        report = to_semi_structured(model)
    except ARMORRuntimeError as error:
        out["skipped"] = str(error)
        return out
    sparse = logits(model, ids)
    ulp = torch.finfo(torch.bfloat16).eps * float(exact.abs().max())
    out.update(
        converted=len(report),
        backends=sorted(set(report.values())),
        sparse_error=float((sparse - exact).abs().max()),
        sparse_vs_dense_max_abs=float((sparse - dense).abs().max()),
        top1_agreement=float((sparse.argmax(-1) == dense.argmax(-1)).float().mean()),
        bound=2 * out["dense_bf16_error"] + ulp,
        max_abs_logit=float(exact.abs().max()),
    )
    out["within_bound"] = out["sparse_error"] <= out["bound"]
    if device.type == "cuda":
        out["semi_structured_forward_ms"] = forward_ms(model, bench_ids)
        out["speedup"] = out["dense_forward_ms"] / out["semi_structured_forward_ms"]
    out["restored"] = to_dense(model)
    out["restored_exact"] = bool(torch.equal(logits(model, ids), dense))
    return out


def failure(error: BaseException) -> dict[str, Any]:
    """A failed step as JSON: the error and the end of its traceback."""
    return {
        "failed": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc()[-4000:],
    }


def reset_llmcompressor() -> None:
    """Reset llm-compressor's session after a failed ``oneshot`` (the next one starts clean)."""
    from llmcompressor.core import reset_session

    reset_session()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import torch  # after argument parsing: `--help` stays fast

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_oneshot.py: --device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "meta": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "layers": args.layers,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "num_iterations": args.num_iterations,
            "wrapper_block_size": args.wrapper_block_size,
            "reconstruction_steps": args.reconstruction_steps,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
        },
        "variants": {},
    }

    def write() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    folder = Path(tempfile.mkdtemp(prefix="smollm2-shaped-"))
    try:
        start = time.perf_counter()
        save_model(folder, args.layers, args.seed)
        dataset = calibration(args.samples, args.seq_len, args.seed)
        result["meta"]["build_seconds"] = time.perf_counter() - start
        print(f"model + data built in {result['meta']['build_seconds']:.1f} s", flush=True)
        for variant in args.variants:
            # a failing step is recorded (with its traceback) and the next one still runs
            try:
                model, row = run_variant(variant, folder, dataset, args, device)
            except Exception as error:  # noqa: BLE001
                result["variants"][variant] = failure(error)
                print(f"{variant}: FAILED\n{traceback.format_exc()}", flush=True)
                write()
                reset_llmcompressor()
                continue
            result["variants"][variant] = row
            print(f"{variant}: {json.dumps(row)}", flush=True)
            write()
            if variant == "armor":
                try:
                    check = semi_structured_check(model, device, args.seed)
                except Exception as error:  # noqa: BLE001
                    check = failure(error)
                    print(f"to_semi_structured: FAILED\n{traceback.format_exc()}", flush=True)
                result["semi_structured"] = check
                print(f"to_semi_structured: {json.dumps(check)}", flush=True)
                write()
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        write()
    print("\n| variant | oneshot s | Linears | all 2:4 | peak GiB |\n|---|---|---|---|---|")
    for variant, row in result["variants"].items():
        if "failed" in row:
            print(f"| {variant} | FAILED: {row['failed'][:80]} | | | |")
            continue
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        print(
            f"| {variant} | {row['seconds']:.1f} | {row['linears']} | {row['all_2of4']} | {peak} |"
        )


if __name__ == "__main__":
    main()
