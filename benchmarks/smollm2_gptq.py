"""2:4 + 4-bit / 8-bit on SmolLM2-135M, side by side: round-to-nearest against GPTQ.

Each base model is pruned once (dense: not at all; SparseGPT 2:4; ARMOR output objective, block 32,
10 iterations) and evaluated; then each quantization stage runs on a deep copy of it through
llm-compressor's ``oneshot`` on the same calibration windows:

- ``w4a16-rtn`` / ``w8a8-rtn``: ``QuantizationModifier`` (round-to-nearest; keeps 2:4 zeros);
- ``w4a16-gptq`` / ``w8a8-gptq``: ``ARMORGPTQModifier`` (GPTQ that keeps every pruned zero; group
  grids fitted as GPTQ reaches them) on the 2:4 bases, llm-compressor's own ``GPTQModifier`` on
  the dense base;
- ``w4a16-gptq-static``: ``ARMORGPTQModifier(static_groups=True)`` (grids fixed from the weight
  before GPTQ, as llm-compressor's ``GPTQModifier`` does);
- ``w4a16-gptq-act``: ``ARMORGPTQModifier(actorder="weight")`` (columns visited by descending
  Hessian diagonal, grids fitted as GPTQ reaches them);
- ``w4a16-rtn-refit`` (ARMOR base, an ablation): ``ARMORGPTQModifier(dampening_frac=1e6)``, whose
  compensation is then negligible (round-to-nearest on the same min-max grids), followed by its
  wrapper refit: what the refit does without GPTQ.

The variants ``-static`` and ``-act`` run on the 2:4 bases only, ``-rtn-refit`` on ARMOR's.

On the ARMOR base ``ARMORGPTQModifier`` refits the wrappers to the quantized cores after GPTQ
(``refit_wrappers`` passes; ``--refit-wrappers`` gives the values, one row each, 0 = off).

``--gptq-dampening`` sets the GPTQ stages' ``dampening_frac`` (several values: one row each);
``--also-valid`` also evaluates the valid splits (defaults are chosen there).

W4A16: symmetric int4 in groups of 64 input columns (divides 576 and 1536; the preset's 128 does
not divide 576). W8A8: int8 per channel, dynamic per-token int8 activations. Every row records
WikiVital / PTB perplexity, the checkpoint's safetensors bytes (armor-ct for ARMOR rows,
llm-compressor's compressed checkpoint otherwise) and the seconds of its stage. Results append to
``--results`` (JSON lines); ``--report`` writes the Markdown table.

Usage::

    python benchmarks/smollm2_gptq.py --bases armor --results R.jsonl      # one process per base
    python benchmarks/smollm2_gptq.py --report R.md --results R.jsonl

Published figures live in ``docs/results/gptq*.json``, rendered into docs/results.md by
``benchmarks/results_doc.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

LM_HEAD = "re:.*lm_head"
GROUP_SIZE = 64
BASES = ("dense", "sparsegpt", "armor")
QUANTS = ("none", "w4a16-rtn", "w4a16-gptq", "w4a16-gptq-static", "w4a16-gptq-act",
          "w4a16-rtn-refit", "w8a8-rtn", "w8a8-gptq")
#: ``dampening_frac`` that makes GPTQ's compensation negligible (``w4a16-rtn-refit``)
NO_COMPENSATION = 1e6


def scheme(quant: str) -> dict:
    """``config_groups`` of a quantization stage."""
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = preset_name_to_scheme("W4A16" if quant.startswith("w4a16") else "W8A8", ["Linear"])
    if quant.startswith("w4a16") and preset.weights is not None:
        preset.weights.group_size = GROUP_SIZE
    return {"group_0": preset.model_dump()}


def base_recipe(base: str, seed: int) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    from armor_modifier import ARMORModifier

    common = {"targets": ["Linear"], "ignore": [LM_HEAD]}
    if base == "sparsegpt":
        return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", **common)]
    # per Linear (reconstruction_steps=0), as docs/results.md#gptq measured it
    fields = {"wrapper_block_size": 32, "num_iterations": 10, "objective": "output",
              "reconstruction_steps": 0}  # fmt: skip
    return [ARMORModifier(seed=seed, **common, **fields)]


def quant_recipe(base: str, quant: str, dampening: float, refit: int) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from armor_modifier.modifier import ARMORGPTQModifier

    groups = scheme(quant)
    if quant == "w4a16-rtn-refit":
        return [ARMORGPTQModifier(config_groups=groups, ignore=[LM_HEAD],
                                  dampening_frac=NO_COMPENSATION, refit_wrappers=refit)]
    if quant.endswith("-rtn"):
        return [QuantizationModifier(config_groups=groups, ignore=[LM_HEAD])]
    if base == "dense":
        return [GPTQModifier(config_groups=groups, ignore=[LM_HEAD], dampening_frac=dampening)]
    return [ARMORGPTQModifier(config_groups=groups, ignore=[LM_HEAD], dampening_frac=dampening,
                              static_groups=quant.endswith("-static"),
                              actorder="weight" if quant.endswith("-act") else None,
                              refit_wrappers=refit)]


def checkpoint_bytes(model) -> int:
    """Safetensors bytes of ``model`` saved as armor-ct (ARMOR rows) or as compressed-tensors'
    compressed checkpoint (other rows), written through a save built for this very model: a deep
    copy inherits llm-compressor's ``save_pretrained`` wrapper of the model it was copied from,
    which would save that model instead."""
    import functools

    from armor_modifier.format.save import _save_with_ct_compression, save_armor_pretrained
    from armor_modifier.runtime import armor_linears

    folder = Path(tempfile.mkdtemp(prefix="gptq-bench-"))
    own = functools.partial(type(model).save_pretrained, model)
    try:
        for attr in ("save_pretrained", "_armor_inner_save"):
            model.__dict__.pop(attr, None)
        if armor_linears(model):
            save_armor_pretrained(model, folder / "ckpt")
        else:
            _save_with_ct_compression(model, own, folder / "ckpt")
        return sum(f.stat().st_size for f in (folder / "ckpt").glob("*.safetensors"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def evaluate(model, tokenizer, texts: dict[str, str], args) -> dict[str, float]:
    from armor_harness import perplexity

    return {
        name: perplexity(
            model, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows or None,
            progress=False,
        ).ppl
        for name, text in texts.items()
    }  # fmt: skip


def is_2of4(model) -> bool:
    from armor_modifier.core import count_broken_groups

    return all(
        count_broken_groups(module.weight.detach().float()) == 0
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name
    )


def run_base(base: str, quants: list[str], calibration, texts, args) -> None:
    from llmcompressor import oneshot

    from armor_harness import load_default_model

    kwargs = {
        "dataset": calibration, "num_calibration_samples": len(calibration),
        "max_seq_length": args.seq_len, "shuffle_calibration_samples": False,
    }  # fmt: skip
    model, tokenizer, _ = load_default_model()
    start = time.perf_counter()
    if base != "dense":
        oneshot(model=model, processor=tokenizer, recipe=base_recipe(base, args.seed), **kwargs)
    prune_seconds = time.perf_counter() - start
    runs = [(q, d, r) for q in quants
            for d in (args.gptq_dampening if "gptq" in q else [args.gptq_dampening[0]])
            for r in (args.refit_wrappers if refits(base, q) else [0])]
    for quant, dampening, refit in runs:
        if (base == "dense" and quant.endswith(("-static", "-act"))) or (
            quant == "w4a16-rtn-refit" and base != "armor"
        ):
            continue  # dense rows: unquantized, round-to-nearest and llm-compressor's own GPTQ
        stage = model if quant == "none" else copy.deepcopy(model)
        start = time.perf_counter()
        if quant != "none":
            recipe = quant_recipe(base, quant, dampening, refit)
            oneshot(model=stage, processor=tokenizer, recipe=recipe, **kwargs)
        row = {
            "base": base,
            "quant": quant,
            "prune_seconds": prune_seconds,
            "quant_seconds": time.perf_counter() - start,
            "ppl": evaluate(stage, tokenizer, texts, args),
            "ppl_valid": evaluate(stage, tokenizer, args.valid_texts, args)
            if args.also_valid else None,
            "is_2of4": is_2of4(stage) if base != "dense" else None,
            # saving compresses in place and leaves a pending decompress hook that a later deep
            # copy would inherit: measure the base model's size on a copy
            "bytes": checkpoint_bytes(copy.deepcopy(stage) if stage is model else stage),
            "setup": {
                "num_samples": args.num_samples, "seq_len": args.seq_len,
                "eval_windows": args.eval_windows, "split": args.split,
                "group_size": GROUP_SIZE, "date": str(date.today()),
                "gptq_dampening": dampening if quant != "w4a16-rtn-refit" else NO_COMPENSATION,
                "refit_wrappers": refit,
                "machine": platform.machine(), "threads": torch.get_num_threads(),
            },
        }  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if stage is not model:
            del stage


def refits(base: str, quant: str) -> bool:
    """Whether the stage is ``ARMORGPTQModifier`` on ARMOR Linears (so ``refit_wrappers`` acts)."""
    return base == "armor" and ("gptq" in quant or quant == "w4a16-rtn-refit")


def label(row: dict) -> str:
    """The quantization column: the stage, GPTQ's dampening when it is not 0.01 and the wrapper
    refit passes when there are any (rows from before the refit have none)."""
    damp = row["setup"].get("gptq_dampening", 0.01)
    passes = row["setup"].get("refit_wrappers", 0)
    text = row["quant"] + (f", damp {damp:g}" if "gptq" in row["quant"] and damp != 0.01 else "")
    if passes and row["quant"] != "w4a16-rtn-refit":
        text += f", refit {passes}"
    elif passes:
        text += f" {passes}"
    return text


def report(results: Path, out: Path) -> None:
    """Markdown table of the newest row of each (base, quantization), bases in ``BASES`` order;
    valid-split columns when the rows have them."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    texts = list(rows[0]["ppl"])
    latest = {(r["base"], label(r)): r for r in rows}
    valid = any(r.get("ppl_valid") for r in rows)
    head = [f"{t} ppl" for t in texts] + ([f"{t} valid ppl" for t in texts] if valid else [])
    lines = [
        "| base | quantization | " + " | ".join(head) + " | 2:4 kept | checkpoint MiB | stage s |",
        "|---|---|" + "---|" * len(head) + "---|---|---|",
    ]  # fmt: skip
    for base in BASES:
        for (row_base, quant), r in latest.items():
            if row_base != base:
                continue
            kept = "-" if r["is_2of4"] is None else ("yes" if r["is_2of4"] else "NO")
            seconds = r["prune_seconds"] if r["quant"] == "none" else r["quant_seconds"]
            cells = [f"{r['ppl'][t]:.2f}" for t in texts]
            if valid:
                cells += [f"{r['ppl_valid'][t]:.2f}" if r.get("ppl_valid") else "-" for t in texts]
            lines.append(
                f"| {base} | {quant} | " + " | ".join(cells)
                + f" | {kept} | {r['bytes'] / 2**20:.1f} | {seconds:.0f} |"
            )  # fmt: skip
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    ap.add_argument("--quants", nargs="+", choices=QUANTS, default=list(QUANTS))
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--split", choices=["test", "valid"], default="test")
    ap.add_argument("--texts", nargs="+", default=["wikivital", "ptb"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gptq-dampening", type=float, nargs="+", default=[0.01],
                    help="dampening_frac of the GPTQ stages; each GPTQ row runs once per value")
    ap.add_argument("--refit-wrappers", type=int, nargs="+", default=None,
                    help="ARMORGPTQModifier's refit_wrappers on the ARMOR base (its default when "
                         "not given); each such row runs once per value")
    ap.add_argument("--also-valid", action="store_true",
                    help="also evaluate the valid splits (same window count)")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/gptq.jsonl"))
    ap.add_argument("--report", type=Path, default=None, help="write the table and exit")
    args = ap.parse_args()
    if args.report:
        report(args.results, args.report)
        return
    torch.set_num_threads(args.threads)
    import armor_modifier.modifier  # noqa: F401  (registers the modifiers)
    from armor_modifier.modifier.gptq import DEFAULT_REFIT_PASSES

    args.refit_wrappers = args.refit_wrappers or [DEFAULT_REFIT_PASSES]
    from armor_harness import calibration_samples, load_default_model, load_text

    _, tokenizer, _ = load_default_model()
    calibration = calibration_samples(
        tokenizer, load_text("wikivital", "train"), args.num_samples, args.seq_len, seed=args.seed
    )
    texts = {name: load_text(name, args.split) for name in args.texts}
    args.valid_texts = {name: load_text(name, "valid") for name in args.texts}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for base in args.bases:
        run_base(base, args.quants, calibration, texts, args)


if __name__ == "__main__":
    main()
