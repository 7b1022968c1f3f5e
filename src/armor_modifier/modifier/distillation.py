"""Model-level distillation (docs/algorithm.md, "Model-level distillation"): a pruned model's ARMOR
parameters fitted jointly to the dense model's next-token distributions.

Decoder-layer reconstruction fits each layer's hidden state; what users measure (perplexity,
zero-shot log-likelihoods) is the output distribution. :func:`distill_model` lowers

    L(θ) = mean over fit windows and positions of KL(p_dense(· | x_<t) || p_θ(· | x_<t))

by Adam on every ARMOR Linear's ``A``, ``B`` and kept core values at once (or a subset; masks
frozen, so every core stays exactly 2:4; on quantized cores the wrappers, optionally with the
scales: :mod:`.scales`), keeping the best iterate on held-out guard windows with
the guarantee of :func:`armor_modifier.core.reconstruct.fit_guarded` (the start wins unless a
later iterate's guard KL is strictly lower).

The dense model is needed once: :func:`teacher_states` records, per window, the input of its
output head ``[1, T, d]``. The head is not pruned, so the dense logits are ``head(state)``,
recomputed at each use instead of keeping the dense model or its ``[T, vocab]`` logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict

import torch
from torch import nn

from armor_modifier.core.distill_settings import DistillationSettings
from armor_modifier.core.errors import ARMORValueError
from armor_modifier.core.reconstruct import ReconstructionResult, fit_guarded, guard_split
from armor_modifier.format.save import ARMOR_RECIPE_ATTR
from armor_modifier.runtime import armor_linears

from .reconstruction import factor_parameters, trainable_factors, write_back_factors
from .scales import (
    quantized_modules,
    trainable_scales,
    weight_quantized,
    with_scale_ratios,
    write_back_scales,
)

__all__ = ["distill_model", "teacher_states"]


def _head(model: nn.Module) -> nn.Linear:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        raise ARMORValueError(
            f"{type(model).__name__} has no Linear output head (get_output_embeddings()); "
            "model-level distillation needs a causal LM"
        )
    return head


def teacher_states(model: nn.Module, windows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The dense model's output-head inputs: per window ``[1, T] -> [1, T, d]`` float32.

    :param model: the dense causal LM (its forward takes ``input_ids``)
    :param windows: token ids ``[1, T]`` per window
    """
    head = _head(model)
    states: list[torch.Tensor] = []

    def record(_module: nn.Module, args: tuple) -> None:
        states.append(args[0].detach().float().clone())

    handle = head.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window, use_cache=False)
    finally:
        handle.remove()
    return states


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No gradient for the model's own parameters (embeddings, norms, head) while inside."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def distill_model(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    states: Sequence[torch.Tensor],
    settings: DistillationSettings,
    progress: Callable[[int, float], None] | None = None,
) -> ReconstructionResult:
    """Fit ``model``'s ARMOR parameters to the dense distributions; write the kept iterate back.

    Uses every field of ``settings`` but ``num_samples`` (the caller chose the windows).

    :param model: the pruned causal LM with ARMOR Linears (e.g. loaded from armor-ct)
    :param windows: token ids ``[1, T]`` per window
    :param states: :func:`teacher_states` of the dense model on the same windows
    :param progress: called as ``progress(step, loss)`` after every step
    :return: the guard KL (nats per token) before and after, the step kept, whether accepted
    :raises ARMORValueError: no ARMOR Linear, a pruned head, parameters that
        :meth:`~DistillationSettings.check_quantization` refuses, or windows and states that
        differ
    """
    head = _head(model)
    linears = armor_linears(model)
    if not linears:
        raise ARMORValueError("the model has no ARMOR Linear to distill; prune it first")
    if head in linears.values():
        raise ARMORValueError("the output head carries ARMOR wrappers; distillation needs it dense")
    quantized_all = quantized_modules(model)
    if windows and (quantized_all or any(not hasattr(m, "weight") for m in linears.values())):
        # a quantized checkpoint as loaded holds packed codes (or no weight) until its first
        # forward, where compressed-tensors decompresses it (a hook it registers on loading)
        with torch.no_grad():
            model(input_ids=windows[0][:, :1], use_cache=False)
    quantized = weight_quantized(linears)
    settings.check_quantization(
        f"{quantized[0]} and {len(quantized) - 1} more cores" if quantized else None
    )
    if len(windows) != len(states):
        raise ARMORValueError(
            f"{len(windows)} windows but {len(states)} teacher states; record the states on "
            "the same windows"
        )
    fit, guard = guard_split(len(windows), settings.guard_fraction)
    moving_scales = settings.parameters == "wrappers+scales"
    params, masks, names = factor_parameters(
        linears, "wrappers" if moving_scales else settings.parameters
    )
    if moving_scales:
        params, masks, names = with_scale_ratios(linears, (params, masks, names))
    low_precision = settings.precision == "bfloat16"
    device = next(model.parameters()).device.type

    def kl(i: int, autocast: bool) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=windows[i], use_cache=False).logits
        log_q = logits.float().log_softmax(-1)
        with torch.no_grad():
            log_p = head(states[i].to(head.weight.dtype)).float().log_softmax(-1)
        positions = log_q.shape[0] * log_q.shape[1]
        return nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum") / positions

    def batch_backward(batch: list[int]) -> float:
        total = 0.0
        for i in batch:
            loss = kl(i, low_precision) / len(batch)
            loss.backward()
            total += float(loss.detach())
        return total

    def guard_error() -> float:
        with torch.no_grad():
            return sum(float(kl(i, False)) for i in guard) / len(guard)

    # a moving core (possible only where no weight is quantized) runs forward_with_core instead
    straight = {k: m for k, m in quantized_all.items()
                if settings.parameters not in ("all", "core") or k not in linears}  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        with _frozen(model), torch.enable_grad(), trainable_factors(linears, names, params), \
                trainable_scales(straight, names, params):
            result = fit_guarded(batch_backward, guard_error, fit, params, masks, settings,
                                 progress, steps=settings.steps,
                                 precision=settings.precision)  # fmt: skip
    finally:
        model.train(was_training)
    if result.accepted:
        write_back_factors(linears, names, params)
        write_back_scales(names, params)
    _record(model, settings, result)
    return result


def _record(model: nn.Module, settings: DistillationSettings, result: ReconstructionResult) -> None:
    """Add the distillation to the recipe an armor-ct save writes (``armor.recipe``, under
    ``"distillation"``): its settings, the guard KL before and after, whether it was kept."""
    recipe = getattr(model, ARMOR_RECIPE_ATTR, None)
    entry = {**asdict(settings), "guard_kl_before": result.initial_error,
             "guard_kl_after": result.final_error, "steps_run": result.steps_run,
             "accepted": result.accepted}  # fmt: skip
    setattr(model, ARMOR_RECIPE_ATTR, {**(recipe or {}), "distillation": entry})
