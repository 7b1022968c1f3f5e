"""``armor_modifier.prune``: the library function behind ``armor prune``, ``ARMORQuantizer`` and the
examples: calibrate, prune with ARMOR 2:4 (optionally quantize) through llm-compressor's
``oneshot``, and save armor-ct.

::

    from armor_modifier import prune
    result = prune("./my-llama", "out/x", dataset="wikivital", num_samples=128,
                   wrapper_block_size=32, num_iterations=10)
    result.model, result.output, result.seconds, result.modifiers

Everything that can be checked before the model loads is (the settings, the recipe file, the
output folder); the output folder is staged and swapped in only when the whole job succeeded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from .calibration import (
    BENCHMARK_MODELS,
    calibration_samples,
    check_shares,
    load_model,
    load_text,
    require_harness,
    split_sources,
)
from .core.distill_settings import DistillationSettings
from .core.errors import ARMORValueError
from .core.options import setting_rows
from .core.reconstruct import ReconstructionResult, ReconstructionSettings
from .core.settings import SolverSettings
from .staging import check_writable, staged_replace

__all__ = [
    "DEFAULT_NUM_SAMPLES",
    "LM_HEAD",
    "QUANT_SCHEMES",
    "SOLVER_FIELDS",
    "PruneResult",
    "armor_recipe",
    "check_output_folder",
    "load_model_and_tokenizer",
    "one_line",
    "prune",
]

#: ``quantize`` choices -> llm-compressor preset scheme names: round-to-nearest with
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
#: group size of ``quantize="w4a16-gptq"`` (divides 576, SmolLM2's width, and every power of 2
#: from 64 up; the preset's 128 does not divide 576)
GPTQ_GROUP_SIZE = 64
LM_HEAD = "re:.*lm_head"
#: calibration windows of a text when ``num_samples`` is not given: 64, chosen over 16 on the
#: tuning half of the zero-shot tasks and on valid perplexity (docs/results.md,
#: zeroshot_defaults_levers)
DEFAULT_NUM_SAMPLES = 64


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` did.

    :param model: the pruned model, in memory (wrappers attached, cores 2:4).
    :param tokenizer: its tokenizer.
    :param output: the armor-ct folder written, or ``None``.
    :param seconds: wall time of ``oneshot`` (calibration and compression).
    :param modifiers: the recipe's modifiers (their ``results``, ``reconstructions``).
    :param distillation: the model-level distillation's result (guard KL before and after, the
        step kept), or ``None`` when it did not run.
    :param distill_seconds: its wall time: the dense model's pass over the windows plus the fit.
    """

    model: Any
    tokenizer: Any
    output: Path | None
    seconds: float
    modifiers: list[Any]
    distillation: ReconstructionResult | None = None
    distill_seconds: float = 0.0


def armor_recipe(
    *,
    seed: int = 0,
    quantize: str = "none",
    settings: SolverSettings | None = None,
    reconstruction: ReconstructionSettings | None = None,
    gptq_reconstruction_steps: int = 0,
    **fields: Any,
) -> list[Any]:
    """``[ARMORModifier]`` (+ a quantization modifier) for every Linear but ``lm_head``.

    :param seed: the solver's base seed.
    :param quantize: one of :data:`QUANT_SCHEMES`.
    :param settings: solver settings (their fields; ``fields`` override single ones).
    :param reconstruction: decoder-layer settings (likewise).
    :param gptq_reconstruction_steps: ``ARMORGPTQModifier.reconstruction_steps`` (a ``*-gptq``
        ``quantize`` only): Adam steps per decoder layer after its cores are quantized.
    :param fields: ``ARMORModifier`` fields (``calibration``, ``progress_dir`` and any setting of
        ``docs/settings.md``).
    :raises ARMORValueError: an unknown field or quantization, or a value its setting refuses.
    """
    from .modifier import ARMORModifier

    known = {row.name for row in setting_rows()} | {"calibration", "progress_dir"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ARMORValueError(f"unknown ARMOR settings {unknown}; the settings are {sorted(known)}")
    if quantize not in QUANT_SCHEMES:
        raise ARMORValueError(f"quantize must be one of {list(QUANT_SCHEMES)}, got {quantize!r}")
    chosen: dict[str, Any] = {}
    if settings is not None:
        chosen.update({f.name: getattr(settings, f.name) for f in dataclass_fields(settings)})
    if reconstruction is not None:
        chosen.update(reconstruction.to_fields())
    chosen.update(fields)
    chosen["seed"] = seed
    SolverSettings(**{k: v for k, v in chosen.items() if k in SOLVER_FIELDS})
    ReconstructionSettings.from_fields(chosen)
    recipe: list[Any] = [ARMORModifier(targets=["Linear"], ignore=[LM_HEAD], **chosen)]
    scheme = QUANT_SCHEMES[quantize]
    if gptq_reconstruction_steps < 0:
        raise ARMORValueError(f"gptq_reconstruction_steps={gptq_reconstruction_steps}: give 0 "
                              "(off) or more Adam steps per decoder layer")  # fmt: skip
    if gptq_reconstruction_steps and not quantize.endswith("-gptq"):
        raise ARMORValueError(
            f"gptq_reconstruction_steps={gptq_reconstruction_steps} fits the cores GPTQ "
            f"quantized, but quantize={quantize!r}: choose w4a16-gptq or w8a8-gptq, or leave it 0"
        )
    if scheme is not None and quantize.endswith("-gptq"):
        recipe.append(gptq_modifier(scheme, gptq_reconstruction_steps))
    elif scheme is not None:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        recipe.append(QuantizationModifier(targets="Linear", scheme=scheme, ignore=[LM_HEAD]))
    return recipe


#: the names of :class:`SolverSettings`' fields
SOLVER_FIELDS = frozenset(f.name for f in dataclass_fields(SolverSettings))


def gptq_modifier(preset: str, reconstruction_steps: int = 0) -> Any:
    """``ARMORGPTQModifier`` for the ``*-gptq`` presets (W4A16 in groups of
    :data:`GPTQ_GROUP_SIZE`, W8A8 per channel), every Linear but ``lm_head``, with
    ``reconstruction_steps`` of reconstruction after GPTQ."""
    from compressed_tensors.quantization import preset_name_to_scheme

    from .modifier import ARMORGPTQModifier

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if preset == "W4A16" and scheme.weights is not None:
        scheme.weights.group_size = GPTQ_GROUP_SIZE
    return ARMORGPTQModifier(config_groups={"group_0": scheme.model_dump()}, ignore=[LM_HEAD],
                             reconstruction_steps=reconstruction_steps)  # fmt: skip


def check_recipe_file(path: str | os.PathLike) -> str:
    """A YAML recipe that llm-compressor parses and that contains an ``ARMORModifier``.

    :raises ARMORValueError: naming the file and what is wrong with it
    """
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


def check_output_folder(
    output: str | os.PathLike, overwrite: bool, progress_dir: str | os.PathLike | None = None
) -> Path:
    """An output folder that may be written: absent, empty (but for ``progress_dir``, which may
    sit in it), or replaced with ``overwrite``."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ARMORValueError(f"output {path} exists and is not a folder")
    progress = Path(progress_dir).resolve() if progress_dir is not None else None
    contents = [p for p in path.iterdir() if p.resolve() != progress] if path.is_dir() else []
    if contents and not overwrite:
        raise ARMORValueError(
            f"output folder {path} exists and is not empty; pass --overwrite (overwrite=True in "
            "Python) to replace it"
        )
    return check_writable(path)


def load_model_and_tokenizer(model: Any, tokenizer: Any = None) -> tuple[Any, Any]:
    """A loaded model (and its tokenizer, loaded from its ``name_or_path`` when not given), or
    a folder / hub id / ``'smollm2'`` loaded in float32."""
    if not isinstance(model, str | os.PathLike):
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        return model, tokenizer
    name = os.fspath(model)
    if name in BENCHMARK_MODELS:
        loaded = require_harness(f"the model {name!r}", "models").load_benchmark_model(name)
    else:
        from .format.loader import check_not_mislabelled

        check_not_mislabelled(Path(name).expanduser())
        loaded = load_model(name)
    return loaded.model, tokenizer if tokenizer is not None else loaded.tokenizer


def prune(
    model: Any,
    output: str | os.PathLike | None = None,
    *,
    tokenizer: Any = None,
    dataset: Any = "wikivital",
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = 512,
    seed: int = 0,
    recipe: str | os.PathLike | list[Any] | None = None,
    quantize: str = "none",
    overwrite: bool = False,
    settings: SolverSettings | None = None,
    reconstruction: ReconstructionSettings | None = None,
    distillation: DistillationSettings | None = None,
    gptq_reconstruction_steps: int = 0,
    **fields: Any,
) -> PruneResult:
    """Prune ``model`` with ARMOR 2:4 through ``oneshot`` and (with ``output``) save armor-ct.

    :param model: a loaded transformers causal LM saved on disk (oneshot re-reads its config
        from ``name_or_path``), a checkpoint folder, a hub id, or ``'smollm2'``.
    :param output: the armor-ct folder to write (staged, swapped in at the end); ``None``: none.
    :param tokenizer: the model's tokenizer (default: loaded with the model).
    :param dataset: the calibration text (``'wikivital'``, ``'ptb'``, a text file,
        ``'hf:NAME[:CONFIG]'``, or several joined by ``+`` sharing the windows equally; the train
        split, cut into random windows) or a tokenized
        ``datasets.Dataset`` with ``input_ids`` used as it is.
    :param num_samples: calibration windows (of a text); how the default was chosen:
        :data:`DEFAULT_NUM_SAMPLES`.
    :param seq_len: tokens per calibration window.
    :param seed: seed of the window sampling and of the solver.
    :param recipe: an llm-compressor recipe (YAML path or list of modifiers, containing an
        ``ARMORModifier``) instead of ``quantize`` / ``settings`` / ``reconstruction`` / fields.
    :param quantize: one of :data:`QUANT_SCHEMES`.
    :param overwrite: replace a non-empty ``output``.
    :param settings: solver settings; ``reconstruction``: decoder-layer settings; ``fields``:
        single ``ARMORModifier`` fields (``calibration``, ``progress_dir`` and any setting of
        ``docs/settings.md``). A ``progress_dir`` inside ``output`` is allowed there and goes
        with the old folder when the new one is swapped in.
    :param distillation: model-level distillation after ``oneshot`` (off unless its ``steps``
        are positive; when ``quantize`` or the recipe quantizes, it runs after the quantization
        and moves ``'wrappers'`` or ``'wrappers+scales'``).
    :param gptq_reconstruction_steps: as in :func:`armor_recipe`.
    :return: the model, tokenizer, output folder, ``oneshot`` time, the modifiers and the
        distillation's result.
    :raises ARMORValueError: bad settings, recipe, sizes or output folder, before any work.
    """
    if num_samples < 1 or seq_len < 1:
        raise ARMORValueError(
            f"num_samples ({num_samples}) and seq_len ({seq_len}) must be positive"
        )
    distilling = distillation is not None and distillation.steps > 0
    progress = fields.get("progress_dir")
    target = check_output_folder(output, overwrite, progress) if output is not None else None
    if recipe is not None:
        given = (
            sorted(fields)
            + [n for n, v in (("settings", settings), ("reconstruction", reconstruction)) if v]
            + (["quantize"] if quantize != "none" else [])
            + (["gptq_reconstruction_steps"] if gptq_reconstruction_steps else [])
        )
        if given:
            raise ARMORValueError(
                f"recipe sets every ARMOR and quantization setting itself; drop {given} or "
                "write them into the recipe"
            )
        modifiers: Any = recipe if isinstance(recipe, list) else check_recipe_file(recipe)
    else:
        modifiers = armor_recipe(
            seed=seed, quantize=quantize, settings=settings, reconstruction=reconstruction,
            gptq_reconstruction_steps=gptq_reconstruction_steps, **fields,
        )  # fmt: skip
    if distilling and distillation is not None:
        quantizes = (recipe_quantizes(modifiers) if recipe is not None
                     else QUANT_SCHEMES.get(quantize) is not None)  # fmt: skip
        distillation.check_quantization("the cores" if quantizes else None)
    texts = None
    if isinstance(dataset, str | os.PathLike):
        sources = split_sources(os.fspath(dataset))
        check_shares(num_samples, len(sources))
        if distilling:
            assert distillation is not None
            check_shares(distillation.num_samples, len(sources))
        texts = [load_text(part, "train") for part in sources]
    loaded, tokenizer = load_model_and_tokenizer(model, tokenizer)
    limit = getattr(getattr(loaded, "config", None), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ARMORValueError(f"seq_len {seq_len} is above the model's context of {limit} tokens")
    if texts is not None:
        dataset = calibration_samples(tokenizer, texts, num_samples, seq_len, seed=seed)
    from llmcompressor import oneshot

    teacher = None
    if distilling:
        assert distillation is not None
        teacher = _Teacher(loaded, tokenizer, texts, dataset, distillation, seq_len, seed)
    start = time.perf_counter()
    count = num_samples if texts is not None else len(dataset)
    # The windows are already drawn with ``seed``; oneshot's default shuffle would draw their
    # order from torch's global generator, so two runs in one process would see them in different
    # orders (and reconstruction, which steps through the windows in order, would differ).
    oneshot(model=loaded, processor=tokenizer, dataset=dataset, recipe=modifiers,
            num_calibration_samples=count, max_seq_length=seq_len,
            shuffle_calibration_samples=False)  # fmt: skip
    seconds = time.perf_counter() - start
    distilled = teacher.distill(loaded) if teacher is not None else None
    if target is not None:
        with staged_replace(target) as stage:
            loaded.save_pretrained(stage)
            tokenizer.save_pretrained(stage)
            _require_armor_ct(stage)
    from llmcompressor.core import active_session

    used = list(active_session().lifecycle.recipe.modifiers) if recipe is not None else modifiers
    return PruneResult(loaded, tokenizer, target, seconds, used, distilled,
                       teacher.seconds if teacher is not None else 0.0)  # fmt: skip


def recipe_quantizes(modifiers: list[Any] | str) -> bool:
    """Whether a recipe (modifiers, or a checked YAML file) quantizes: holds a modifier of
    llm-compressor's quantization family (``QuantizationModifier``, ``GPTQModifier``,
    ``ARMORGPTQModifier``)."""
    from llmcompressor.modifiers.quantization import QuantizationMixin

    if isinstance(modifiers, str):
        from llmcompressor.recipe import Recipe

        modifiers = list(Recipe.create_instance(modifiers).modifiers)
    return any(isinstance(m, QuantizationMixin) for m in modifiers)


class _Teacher:
    """The dense model's output-head inputs on the distillation windows, recorded before
    ``oneshot`` prunes the model in place; :meth:`distill` fits the pruned model to them."""

    def __init__(self, model: Any, tokenizer: Any, texts: Any, dataset: Any,
                 settings: DistillationSettings, seq_len: int, seed: int) -> None:  # fmt: skip
        import torch

        from .modifier.distillation import teacher_states

        if texts is not None:
            rows = calibration_samples(tokenizer, texts, settings.num_samples, seq_len,
                                       seed=seed)["input_ids"]  # fmt: skip
        else:
            rows = list(dataset["input_ids"])[: settings.num_samples]
        if len(rows) < settings.min_windows():
            raise ARMORValueError(
                f"distillation needs at least {settings.min_windows()} windows at guard fraction "
                f"{settings.guard_fraction}; the dataset has {len(rows)}"
            )
        device = next(model.parameters()).device
        self.windows = [torch.tensor(row, dtype=torch.long, device=device).unsqueeze(0)
                        for row in rows]  # fmt: skip
        self.settings = settings
        start = time.perf_counter()
        self.states = teacher_states(model, self.windows)
        self.seconds = time.perf_counter() - start

    def distill(self, model: Any) -> ReconstructionResult:
        from tqdm import tqdm

        from .modifier.distillation import distill_model

        with tqdm(total=self.settings.steps, desc="ARMOR distillation") as bar:
            result = distill_model(model, self.windows, self.states, self.settings,
                                   progress=lambda step, loss: bar.update(1))  # fmt: skip
        self.seconds += result.seconds
        self.states = []
        return result


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
