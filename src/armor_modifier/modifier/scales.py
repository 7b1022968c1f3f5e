"""Quantized cores whose scales move while their codes stay (docs/algorithm.md, "Model-level
distillation"): the ``'wrappers+scales'`` parameter set of the distillation, and the forward
every quantized Linear runs during a distillation.

A Linear that llm-compressor quantized (``QuantizationModifier``, ``ARMORGPTQModifier``) computes
with the core ``levels · scale``: its ``weight_scale`` ``[m, G]`` (``G`` groups of ``n / G``
columns; one for a channel, ``[1]`` for a tensor scale) repeated over each group, times codes
``levels``: integers ``q - zero_point``, or FP8 values. GPTQ leaves the weight on that grid;
round-to-nearest leaves it off until the forward or the checkpoint rounds it, so the codes are
taken as the forward rounds them. Fitting a ratio ``r`` (same shape as the scale, starting at 1)
gives the core ``levels · (scale ⊙ |r|)`` (a scale stays positive): the codes, the zero points and
with them the 2:4 mask never change, and Adam's steps on ``r`` are relative ones, like those on
the near-identity wrappers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from compressed_tensors.quantization import QuantizationStatus
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
#: the most a float32 quantized core may differ from ``levels · scale`` (in steps) for its levels
#: to count as codes; float32 division leaves a few ulps (4.8e-7 observed on the tiny Llama's
#: W4A16 GPTQ cores, 7.6e-6 on its W8A8 ones)
_GRID_TOLERANCE = 1e-3


def quantized_linears(linears: dict[str, nn.Linear]) -> list[str]:
    """The keys of ``linears`` whose weights carry a quantization scheme."""
    return [k for k, m in linears.items() if getattr(m, "quantization_scheme", None) is not None]


def _scale(module: nn.Linear) -> torch.Tensor:
    """The module's ``weight_scale`` (detached)."""
    return cast(torch.Tensor, getattr(module, SCALE)).detach()


def _expanded(scale: torch.Tensor, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``scale`` ``[R, G]`` (``[m, G]`` for groups or channels, ``[1]`` for a tensor, blocks of
    ``m/R x n/G``) repeated over each group's rows and columns: ``[m, n]`` float32."""
    scale = scale.float().reshape(scale.shape[0], -1) if scale.dim() else scale.float().view(1, 1)
    if weight.shape[0] % scale.shape[0] or weight.shape[1] % scale.shape[1]:
        raise ARMORValueError(
            f"{key}: a weight_scale of shape {tuple(scale.shape)} does not tile its "
            f"{tuple(weight.shape)} weight"
        )
    rows, columns = weight.shape[0] // scale.shape[0], weight.shape[1] // scale.shape[1]
    return scale.repeat_interleave(rows, dim=0).repeat_interleave(columns, dim=1)


def _levels(module: nn.Linear, key: str) -> torch.Tensor:
    """The codes ``[m, n]`` (float32) of ``module``'s core on its scale's grid, as its own
    forward rounds it: integers for an int scheme (``q - zero_point``), FP8 values for a float
    one."""
    if getattr(module, "weight_g_idx", None) is not None:
        raise ARMORValueError(
            f"{key} was quantized with activation ordering (weight_g_idx); its scales cannot "
            "move with the codes fixed: distill with parameters='wrappers'"
        )
    args: Any = getattr(module, "quantization_scheme").weights  # noqa: B009  (typed as Any)
    # after round-to-nearest (QuantizationModifier) the weight is still the float core, rounded
    # only by the forward and the checkpoint's compression: take the codes those give
    weight = _own_core(module)
    ratio = weight.float() / _expanded(_scale(module), weight, key)
    if args.type == "float" and args.num_bits == 8:
        levels = ratio.to(torch.float8_e4m3fn).float()
    elif args.type == "int":
        levels = ratio.round()
    else:
        raise ARMORValueError(
            f"{key}: {args.num_bits}-bit {args.type} weights; moving scales needs int or FP8 "
            "codes: distill with parameters='wrappers'"
        )
    # the core is levels · scale rounded to the weight's dtype: a relative error of at most
    # half its epsilon, i.e. |levels| · eps / 2 of a step (plus float32 division's ulps)
    slack = levels.abs() * torch.finfo(weight.dtype).eps + _GRID_TOLERANCE
    if bool(((ratio - levels).abs() > slack).any()):
        off = float(((ratio - levels).abs() - slack).max())
        raise ARMORValueError(
            f"{key}'s core is not on its weight_scale grid (off by {off:.3g} of a step beyond "
            "rounding); distill with parameters='wrappers'"
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


def _quantized_forward(
    module: nn.Linear, core: Callable[[], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward(x [..., n]) -> [..., m]``: the module's activation quantization (straight
    through) around ``x -> core() x + bias``."""
    scheme: Any = getattr(module, "quantization_scheme")  # noqa: B009  (typed as Any)
    enabled = getattr(module, "quantization_enabled", True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if enabled and scheme.input_activations is not None:
            x = _straight_through(module, x, "input", scheme.input_activations)
        y = nn.functional.linear(x, core().to(x.dtype), module.bias)
        if enabled and scheme.output_activations is not None:
            y = _straight_through(module, y, "output", scheme.output_activations)
        return y

    return forward


def _own_core(module: nn.Linear) -> torch.Tensor:
    """The core the module's own forward uses: its weight, fake-quantized unless compressed."""
    scheme: Any = getattr(module, "quantization_scheme")  # noqa: B009  (typed as Any)
    weight = module.weight.detach()
    status = getattr(module, "quantization_status", None)
    if not getattr(module, "quantization_enabled", True) or scheme.weights is None:
        return weight
    if status is not None and status >= QuantizationStatus.COMPRESSED:
        return weight
    with torch.no_grad():
        return forward_quantize(module, weight, "weight", scheme.weights)


def _scaled_core(
    levels: torch.Tensor, scale: torch.Tensor, ratio: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """``levels · (scale ⊙ |ratio|)`` ``[m, n]``, formed at each call (``ratio`` moves)."""
    return lambda: levels * _expanded(scale * ratio.abs(), levels, "")


def _fixed_core(core: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: core


@contextmanager
def trainable_scales(
    linears: dict[str, nn.Linear],
    names: list[tuple[str, nn.Linear, str]],
    params: list[torch.Tensor],
) -> Iterator[None]:
    """Make every quantized Linear of ``linears`` quantize its input and output straight
    through, and compute its core as ``levels · (scale ⊙ |ratio|)`` where ``params`` has a ratio
    named with :data:`SCALE` for it (gradients reach the ratio), else as its own forward does;
    its own forward comes back on exit, its weight and scale unchanged."""
    ratios = {key: p for (key, _, attr), p in zip(names, params, strict=True) if attr == SCALE}
    saved = {}
    for key in quantized_linears(linears):
        module = linears[key]
        saved[module] = module.__dict__.get("forward")
        if key in ratios:
            core = _scaled_core(_levels(module, key), _scale(module).float(), ratios[key])
        else:
            core = _fixed_core(_own_core(module))
        setattr(module, "forward", _quantized_forward(module, core))  # noqa: B010
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
