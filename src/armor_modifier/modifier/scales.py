"""Quantized cores whose scales move while their integer codes stay (docs/algorithm.md,
"Model-level distillation"): the ``'wrappers+scales'`` parameter set of the distillation.

A Linear that llm-compressor quantized (``QuantizationModifier`` or ``ARMORGPTQModifier``) holds its
core on the grid of its ``weight_scale ``[m, G]`` (``G`` groups of ``n / G`` columns; one for a
channel, ``[1]`` for a tensor scale): ``core = levels · scale`` column-group-wise with integer
``levels = q - zero_point``. Fitting a ratio ``r`` (same shape as the scale, starting at 1) gives
the core ``levels · (scale ⊙ |r|)`` (so a scale stays positive): the codes, the zero points and
with them the 2:4 mask never change, and Adam's steps on ``r`` are relative ones like those on the
near-identity wrappers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.utils import update_offload_parameter
from torch import nn

from armor_modifier.core.errors import ARMORValueError

__all__ = [
    "SCALE",
    "quantized_linears",
    "scale_parameters",
    "trainable_scales",
    "write_back_scales",
]

#: the attribute name of a scale ratio in the ``(key, module, attribute)`` names of the fit
SCALE = "weight_scale"
#: the most a quantized core may differ from ``levels · scale`` (relative to the scale) for its
#: levels to count as integers; float32 division leaves at most a few ulps (4.8e-7 observed on
#: the tiny Llama's W4A16 GPTQ cores)
_GRID_TOLERANCE = 1e-3


def quantized_linears(linears: dict[str, nn.Linear]) -> list[str]:
    """The keys of ``linears`` whose weights carry a quantization scheme."""
    return [k for k, m in linears.items() if getattr(m, "quantization_scheme", None) is not None]


def _scale(module: nn.Linear) -> torch.Tensor:
    """The module's ``weight_scale`` (detached)."""
    return cast(torch.Tensor, getattr(module, SCALE)).detach()


def _expanded(scale: torch.Tensor, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``scale`` ``[m, G]`` (or ``[1]``) repeated over each group's columns: ``[m, n]`` float32."""
    scale = scale.float().reshape(scale.shape[0], -1) if scale.dim() else scale.float().view(1, 1)
    columns = weight.shape[1]
    if columns % scale.shape[1]:
        raise ARMORValueError(
            f"{key}: {scale.shape[1]} scale groups do not divide its {columns} columns"
        )
    return scale.repeat_interleave(columns // scale.shape[1], dim=1).expand_as(weight)


def _levels(module: nn.Linear, key: str) -> torch.Tensor:
    """The integer levels ``[m, n]`` (float32) of ``module``'s core on its scale's grid."""
    if getattr(module, "weight_g_idx", None) is not None:
        raise ARMORValueError(
            f"{key} was quantized with activation ordering (weight_g_idx); its scales cannot "
            "move with the codes fixed: distill with parameters='wrappers'"
        )
    weight = module.weight.detach().float()
    scale = _expanded(_scale(module), weight, key)
    ratio = weight / scale
    levels = ratio.round()
    off = float((ratio - levels).abs().max()) if weight.numel() else 0.0
    if off > _GRID_TOLERANCE:
        raise ARMORValueError(
            f"{key}'s core is not on its weight_scale grid (off by {off:.3g} of a step); "
            "distill with parameters='wrappers'"
        )
    return levels


def scale_parameters(
    linears: dict[str, nn.Linear],
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[tuple[str, nn.Linear, str]]]:
    """A ratio ``r`` of ones per quantized Linear, shaped like its ``weight_scale``.

    :return: ``(params, masks, names)`` as :func:`~.reconstruction.factor_parameters` gives them
        (masks ``None``; names ``(key, module, SCALE)``)
    :raises ARMORValueError: a core off its grid, or quantized with activation ordering
    """
    params, names = [], []
    for key in quantized_linears(linears):
        module = linears[key]
        _levels(module, key)
        params.append(torch.ones_like(_scale(module), dtype=torch.float32))
        names.append((key, module, SCALE))
    masks: list[torch.Tensor | None] = [None] * len(params)
    return params, masks, names


def _straight_through(
    module: nn.Linear, value: torch.Tensor, base: str, args: Any
) -> torch.Tensor:
    """``value`` fake-quantized as the module's own forward does it, with the identity's
    gradient (compressed-tensors' rounding has none, which would cut the fit's gradient at every
    quantized input, e.g. every W8A8 Linear's)."""
    return value + (forward_quantize(module, value, base, args) - value).detach()


def _scaled_forward(
    module: nn.Linear, levels: torch.Tensor, scale: torch.Tensor, ratio: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward(x [..., n]) -> [..., m]``: the module's activation quantization (straight
    through) around ``x -> (levels · (scale ⊙ |ratio|)) x + bias``."""
    scheme: Any = getattr(module, "quantization_scheme")  # noqa: B009  (typed as Any)
    enabled = getattr(module, "quantization_enabled", True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if enabled and scheme.input_activations is not None:
            x = _straight_through(module, x, "input", scheme.input_activations)
        core = levels * _expanded(scale * ratio.abs(), levels, "")
        y = nn.functional.linear(x, core.to(x.dtype), module.bias)
        if enabled and scheme.output_activations is not None:
            y = _straight_through(module, y, "output", scheme.output_activations)
        return y

    return forward


@contextmanager
def trainable_scales(
    linears: dict[str, nn.Linear],
    names: list[tuple[str, nn.Linear, str]],
    params: list[torch.Tensor],
) -> Iterator[None]:
    """Make every quantized Linear of ``linears`` compute ``levels · (scale ⊙ |ratio|)`` times
    its (straight-through quantized) input, with its ratio from ``params`` where one is named
    with :data:`SCALE` (gradients reach it), else fixed at one (its own forward's values, with
    gradients reaching the wrappers through the quantized activations); its own forward comes
    back on exit, its weight and scale unchanged."""
    ratios = {key: p for (key, _, attr), p in zip(names, params, strict=True) if attr == SCALE}
    saved = {}
    for key in quantized_linears(linears):
        module = linears[key]
        saved[module] = module.__dict__.get("forward")
        scale = _scale(module).float()
        ratio = ratios.get(key, torch.ones_like(scale))
        setattr(module, "forward", _scaled_forward(module, _levels(module, key), scale, ratio))  # noqa: B010
    try:
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                setattr(module, "forward", forward)  # noqa: B010  (an instance attribute)


def write_back_scales(names: list[tuple[str, nn.Linear, str]], params: list[torch.Tensor]) -> None:
    """Give every module named with :data:`SCALE` the scale ``scale ⊙ |ratio|`` (in the scale's
    dtype) and the core ``levels · scale`` on it, so re-quantizing the core gives its codes."""
    for (key, module, attr), ratio in zip(names, params, strict=True):
        if attr != SCALE:
            continue
        levels = _levels(module, key)
        old = _scale(module)
        new = (old.float() * ratio.detach().abs()).to(old.dtype)
        core = levels * _expanded(new, levels, key)
        with torch.no_grad():
            update_offload_parameter(module, SCALE, new)
            update_offload_parameter(module, "weight", core.to(module.weight.dtype))
