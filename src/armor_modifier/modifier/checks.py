"""Target resolution and the checks :class:`~armor_modifier.modifier.ARMORModifier` runs before
any calibration: which Linears to prune, whether each one can be pruned, and whether the rest of
the recipe would undo ARMOR's result.

Everything here raises ``ValueError``/``TypeError`` naming the module, the value and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from compressed_tensors.utils import match_named_modules, match_targets
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES
from loguru import logger
from torch import nn

from armor_modifier.core.errors import ARMORTypeError, ARMORValueError
from armor_modifier.runtime import is_armor_linear

from .collectives import rank_and_world

__all__ = [
    "MODIFIERS_REFUSED_AFTER",
    "calibration_batches",
    "check_calibration_set",
    "check_guard_windows",
    "check_recipe_composition",
    "check_shared_calibration_pass",
    "check_target_linear",
    "check_target_linears",
    "checked_targets",
    "is_ignored",
    "resolve_target_linears",
]

#: modifiers that must not run after ARMOR, with the reason. Matched on class names in the MRO, so
#: subclasses are caught without importing optional back-ends.
MODIFIERS_REFUSED_AFTER: dict[str, str] = {
    "GPTQModifier": (
        "GPTQ in llm-compressor 0.14 does not preserve an existing sparsity mask: its error "
        "feedback fills the pruned zeros and breaks the 2:4 core. Use ARMORGPTQModifier "
        "(armor_modifier.modifier), the same GPTQ that keeps every pruned zero"
    ),
    "AutoRoundModifier": "AutoRound's learned rounding can round pruned zeros away from zero",
    "AWQModifier": (
        "AWQ folds per-channel scales into the Linear's input columns and the previous layer, "
        "but ARMOR's input wrapper B mixes channels in between, so the fold changes the model"
    ),
    "SmoothQuantModifier": (
        "SmoothQuant folds per-channel scales across ARMOR's input wrapper B, changing the model"
    ),
    "LogarithmicEqualizationModifier": (
        "logarithmic equalization folds per-channel scales across ARMOR's input wrapper B"
    ),
    "SpinQuantModifier": "SpinQuant rotates the weights, which makes the 2:4 core dense",
    "QuIPModifier": "QuIP rotates the weights, which makes the 2:4 core dense",
    "SparsityModifierBase": (
        "a second pruning pass would re-prune ARMOR's core with the wrong statistics"
    ),
}


#: Fewer calibration tokens than this get a warning (one 512-token window).
MIN_TOKENS = 512


#: Subclasses of refused modifiers that keep ARMOR's result (matched on the class name).
MODIFIERS_ALLOWED_AFTER = ("ARMORGPTQModifier",)


def is_ignored(name: str, module: nn.Module, ignore: Sequence[str]) -> bool:
    """llm-compressor's ``ignore`` matching, plus plain names matching as a dotted suffix.

    ``"lm_head"`` therefore protects ``lm_head`` and ``model.lm_head``; ``"re:..."`` entries and
    class names behave exactly as in compressed-tensors.
    """
    if match_targets(name, module, ignore):
        return True
    return any(not entry.startswith("re:") and name.endswith("." + entry) for entry in ignore)


def _join(prefix: str, name: str) -> str:
    # llm-compressor joins with a dot even for the layer itself, giving "lm_head."
    # (docs/stack.md, '"lm_head." naming')
    return f"{prefix}.{name}" if name else prefix


def checked_targets(
    model: nn.Module, targets: str | list[str], ignore: Sequence[str]
) -> dict[str, nn.Linear]:
    """The Linears a modifier with these ``targets`` / ``ignore`` prunes, each checked
    (:func:`check_target_linears`); ``{name: Linear}`` in model order.

    :raises ARMORValueError: when the targets match nothing, or nothing is left after ``ignore``
    """
    layers = dict(match_named_modules(model, targets))
    if not layers:
        raise ARMORValueError(
            f"targets={targets!r} match no module of {type(model).__name__}; use "
            "'Linear', a class name, an exact module name or a 're:' pattern"
        )
    modules = resolve_target_linears(layers, ignore)
    if not modules:
        raise ARMORValueError(
            f"targets={targets!r} matched {list(layers)[:5]}... but, after ignore="
            f"{ignore!r}, no nn.Linear is left to prune"
        )
    check_target_linears(model, modules)
    return modules


def resolve_target_linears(
    target_layers: dict[str, nn.Module], ignore: Sequence[str]
) -> dict[str, nn.Linear]:
    """The Linears ARMOR prunes: prunable layers inside each target layer, minus ``ignore``.

    :param target_layers: name -> module matched by ``targets`` (decoder layers or Linears)
    :param ignore: llm-compressor ignore entries (see :func:`is_ignored`)
    :return: full module name (no trailing dot) -> Linear, in model order, de-duplicated
    :raises TypeError: a matched prunable layer or a target is not an ``nn.Linear``
    """
    resolved: dict[str, nn.Linear] = {}
    seen: set[int] = set()
    for layer_name, layer in target_layers.items():
        if isinstance(layer, nn.Embedding) and not is_ignored(layer_name, layer, ignore):
            raise ARMORTypeError(
                f"target module {layer_name!r} is a {type(layer).__name__}; ARMOR prunes "
                "nn.Linear only. Narrow `targets` (e.g. 'Linear' or 're:model.layers.\\d+$') "
                f"or add {layer_name!r} to `ignore`."
            )
        for sub_name, module in match_named_modules(layer, PRUNABLE_LAYER_TYPES):
            name = _join(layer_name, sub_name)
            if id(module) in seen or is_ignored(name, module, ignore):
                continue
            if not isinstance(module, nn.Linear):
                raise ARMORTypeError(
                    f"module {name!r} matched the targets but is a {type(module).__name__}; "
                    f"ARMOR prunes nn.Linear only. Add {name!r} (or "
                    f"'{type(module).__name__}') to `ignore`."
                )
            seen.add(id(module))
            resolved[name] = module
    return resolved


def _shared_parameter_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def check_target_linear(
    name: str, module: nn.Linear, shared: dict[int, list[str]] | None = None
) -> None:
    """Reject a Linear ARMOR cannot prune in place.

    :param shared: ``id(parameter) -> all names`` of the model (for tied weights)
    :raises ValueError: dimensions not multiples of 4, tied weight, already quantized or wrapped
    """
    m, n = module.weight.shape
    if m % 4 or n % 4:
        raise ARMORValueError(
            f"module {name!r} has weight {m}x{n}; ARMOR 2:4 needs both dimensions divisible "
            f"by 4. Add {name!r} to `ignore`."
        )
    tied = (shared or {}).get(id(module.weight), [])
    if len(tied) > 1:
        raise ARMORValueError(
            f"module {name!r} shares its weight with {[t for t in tied if t != name + '.weight']} "
            "(tied embeddings); pruning it would also prune those. Add "
            f"'re:.*{name.rsplit('.', 1)[-1]}' to `ignore`."
        )
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is not None:
        raise ARMORValueError(
            f"module {name!r} already has a quantization scheme; ARMORModifier must come before "
            "every quantization modifier in the recipe (and cannot prune a quantized model)."
        )
    if is_armor_linear(module):
        raise ARMORValueError(
            f"module {name!r} already carries ARMOR wrappers; it cannot be pruned twice"
        )
    if module.weight.device.type != "meta" and not torch.isfinite(module.weight).all():
        bad = int((~torch.isfinite(module.weight)).sum())
        raise ARMORValueError(
            f"module {name!r} has {bad} non-finite (NaN/Inf) weight entries; nothing was pruned. "
            f"Repair the checkpoint or add {name!r} to `ignore`."
        )


def check_target_linears(model: nn.Module, modules: dict[str, nn.Linear]) -> None:
    """:func:`check_target_linear` for every resolved Linear of ``model``."""
    shared = _shared_parameter_names(model)
    for name, module in modules.items():
        check_target_linear(name, module, shared)


def check_calibration_set(calib: object) -> None:
    """Refuse an empty calibration set; warn when it holds fewer than :data:`MIN_TOKENS` tokens.

    :param calib: llm-compressor's calibration dataloader (``state.data.calib``) or ``None``
    """
    if calib is None or not hasattr(calib, "__len__"):
        return
    if len(calib) == 0:
        raise ARMORValueError(
            "the calibration set is empty; ARMOR needs calibration tokens for every target "
            "(pass a non-empty `dataset` to oneshot)"
        )
    dataset = getattr(calib, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        return
    try:
        tokens = sum(len(row["input_ids"]) for row in dataset)
    except (KeyError, TypeError):
        return
    if tokens < MIN_TOKENS:
        logger.warning(
            f"the calibration set holds {tokens} tokens in {len(dataset)} samples, fewer than "
            f"{MIN_TOKENS}: the statistics will be poor (docs use 16 samples x 512 tokens)"
        )


def check_recipe_composition(me: object, modifiers: Iterable[object]) -> None:
    """Refuse recipes where a modifier after ``me`` would silently undo ARMOR.

    :param me: the ARMORModifier instance (found in ``modifiers`` by identity)
    :param modifiers: the session recipe's modifiers, in order
    :raises ValueError: naming the offending modifier, the reason and the alternative
    """
    modifiers = list(modifiers)
    index = next((i for i, mod in enumerate(modifiers) if mod is me), None)
    if index is None:
        return
    for later in modifiers[index + 1 :]:
        if later is me:
            continue
        if type(later).__name__ in MODIFIERS_ALLOWED_AFTER:
            continue
        for cls in type(later).__mro__:
            reason = MODIFIERS_REFUSED_AFTER.get(cls.__name__)
            if reason is None:
                continue
            raise ARMORValueError(
                f"{type(later).__name__} after ARMORModifier is not supported: {reason}. Use "
                "QuantizationModifier (round-to-nearest, e.g. scheme='FP8_DYNAMIC', 'W8A8' or "
                "'W4A16'), which keeps ARMOR's 2:4 core exactly, and keep "
                "ignore=['re:.*lm_head'] on it."
            )


def check_shared_calibration_pass(
    me: object, modifiers: Iterable[object], modules: dict[str, nn.Linear]
) -> None:
    """Refuse static activation observers that would calibrate on ``x`` instead of ``B x``.

    With ``pipeline="sequential"`` every modifier shares one calibration pass, so a later
    quantization modifier's static input observers on ARMOR's targets run before ARMOR has
    compressed (and wrapped) that layer. The default ``pipeline="independent"`` gives ARMOR its own
    pass first; dynamic activation schemes have no observers and are unaffected.

    :param modifiers: the modifiers of the current calibration pass (the session recipe's)
    :param modules: ARMOR's targets, name -> Linear
    """
    if not any(mod is not me for mod in modifiers):
        return
    for name, module in modules.items():
        scheme = getattr(module, "quantization_scheme", None)
        inputs = getattr(scheme, "input_activations", None)
        if inputs is not None and not inputs.dynamic:
            raise ARMORValueError(
                f"module {name!r} has static input-activation quantization calibrated in the "
                "same pass as ARMOR (pipeline='sequential'): its observer would see x instead of "
                "ARMOR's B·x. Use oneshot's default pipeline='independent', or a dynamic "
                "activation scheme (FP8_DYNAMIC, W8A8)."
            )


def calibration_batches(calib: Any) -> int | None:
    """The calibration batches over all ranks (this rank's dataloader length times the world
    size), or ``None`` for no dataloader or one without a length."""
    try:
        return len(calib) * rank_and_world()[1]
    except TypeError:
        return None


def check_guard_windows(settings: Any, calib: Any) -> None:
    """Refuse a calibration set too small to hold out a guard window (before any work).

    :param settings: the :class:`~armor_modifier.core.reconstruct.ReconstructionSettings`.
    :param calib: llm-compressor's calibration dataloader (its length counts this rank's batches).
    """
    batches = calibration_batches(calib)
    if settings.fit_steps == 0 or batches is None:
        return
    need = settings.min_windows()
    if batches < need:
        raise ARMORValueError(
            f"reconstruction_steps={settings.steps} holds out "
            f"reconstruction_guard_fraction={settings.guard_fraction:g} of the "
            f"calibration batches, but there are only {batches}: pass at least {need} "
            "calibration samples (batches), or raise the fraction"
        )
