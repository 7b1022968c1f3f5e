"""Quantized cores whose scales move while their codes stay (docs/algorithm.md, "Model-level
distillation"): the ``'wrappers+scales'`` parameter set of the distillation, and the forward
every quantized Linear runs during a distillation.

A Linear that llm-compressor quantized (``QuantizationModifier``, ``ARMORGPTQModifier``) computes
with the core ``levels · scale``: its ``weight_scale`` ``[R, G]`` (one row per output channel and
one column per group of inputs, ``[m, 1]`` per channel, ``[1]`` per tensor, or one entry per
block) repeated over what each entry covers, times codes ``levels``: integers ``q - zero_point``,
or FP8 values. GPTQ leaves the weight on that grid; round-to-nearest leaves it off until the
forward or the checkpoint rounds it, so the codes are taken as the forward rounds them. Fitting a
ratio ``r`` (same shape as the scale, starting at 1) gives the core ``levels · (scale ⊙ |r|)`` (a
scale stays positive): the codes, the zero points and with them the 2:4 mask never change, and
Adam's steps on ``r`` are relative ones, like those on the near-identity wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from compressed_tensors.quantization import QuantizationStatus, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.utils import update_offload_parameter
from loguru import logger
from torch import nn

from armor_modifier.core.errors import ARMORValueError

__all__ = [
    "SCALE",
    "quantized_modules",
    "scale_parameters",
    "trainable_scales",
    "weight_quantized",
    "with_scale_ratios",
    "write_back_scales",
]

#: the attribute name of a scale ratio in the ``(key, module, attribute)`` names of the fit
SCALE = "weight_scale"
#: how far (in units of the scale) a float32 core may lie from ``levels · scale`` for its levels
#: to count as codes; float32 division leaves a few ulps (4.8e-7 observed on the tiny Llama's
#: W4A16 GPTQ cores, 7.6e-6 on its W8A8 ones)
_GRID_TOLERANCE = 1e-3

_Names = list[tuple[str, nn.Linear, str]]


def _scheme(module: nn.Module) -> Any:
    return getattr(module, "quantization_scheme", None)


def quantized_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """``{name: Linear}`` of every Linear of ``model`` with a quantization scheme (weights,
    activations or both), model order."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and _scheme(m) is not None}  # fmt: skip


def weight_quantized(linears: dict[str, nn.Linear]) -> list[str]:
    """The keys of ``linears`` whose weights are quantized (a scheme with ``weights``)."""
    return [k for k, m in linears.items() if getattr(_scheme(m), "weights", None) is not None]


def _scale(module: nn.Linear) -> torch.Tensor:
    """The module's ``weight_scale`` (detached)."""
    return cast(torch.Tensor, getattr(module, SCALE)).detach()


def _tiling(module: nn.Linear, key: str) -> tuple[int, int]:
    """Rows and columns each ``weight_scale`` entry covers (the last ones may cover fewer)."""
    args = _scheme(module).weights
    scale = _scale(module)
    m, n = module.weight.shape
    if scale.numel() == 1:
        return m, n
    rows, groups = scale.shape[0], scale.reshape(scale.shape[0], -1).shape[1]
    if args.strategy == QuantizationStrategy.BLOCK and args.block_structure:
        height, width = args.block_structure
    elif args.strategy == QuantizationStrategy.GROUP and args.group_size:
        height, width = 1, args.group_size
    else:
        height, width = math.ceil(m / rows), math.ceil(n / groups)
    if math.ceil(m / height) != rows or math.ceil(n / width) != groups:
        raise ARMORValueError(
            f"{key}: a weight_scale of shape {tuple(scale.shape)} does not tile its {m}x{n} "
            "weight in the way its scheme says; distill with parameters='wrappers'"
        )
    return height, width


def _expanded(scale: torch.Tensor, tiling: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """``scale`` repeated over the ``tiling`` each entry covers, cut to ``shape``: float32."""
    scale = scale.float().reshape(scale.shape[0], -1) if scale.dim() else scale.float().view(1, 1)
    full = scale.repeat_interleave(tiling[0], dim=0).repeat_interleave(tiling[1], dim=1)
    return full[: shape[0], : shape[1]]


def _own_core(module: nn.Linear) -> torch.Tensor:
    """The core the module's own forward uses: its weight, fake-quantized unless compressed.

    :raises ARMORValueError: the weight still holds packed codes (never decompressed)
    """
    weight = module.weight.detach()
    if not weight.dtype.is_floating_point or weight.dtype == torch.float8_e4m3fn:
        raise ARMORValueError(
            f"a quantized Linear still holds {weight.dtype} codes; run one forward of the "
            "loaded model first (compressed-tensors decompresses at the first forward)"
        )
    args = getattr(_scheme(module), "weights", None)
    status = getattr(module, "quantization_status", None)
    if args is None or not getattr(module, "quantization_enabled", True):
        return weight
    if status is not None and status >= QuantizationStatus.COMPRESSED:
        return weight
    with torch.no_grad():
        return forward_quantize(module, weight, "weight", args)


def _codes(module: nn.Linear, key: str, tiling: tuple[int, int]) -> torch.Tensor:
    """The codes ``[m, n]`` of ``module``'s core on its scale's grid, as its own forward rounds
    it: integers ``q - zero_point`` (int16) for an int scheme, FP8 values for a float one."""
    args = _scheme(module).weights
    if getattr(module, "weight_g_idx", None) is not None:
        raise ARMORValueError(
            f"{key} was quantized with activation ordering (weight_g_idx); its scales cannot "
            "move with the codes fixed: distill with parameters='wrappers'"
        )
    weight = _own_core(module)
    ratio = weight.float() / _expanded(_scale(module), tiling, weight.shape)
    if args.type == "float" and args.num_bits == 8:
        codes = ratio.to(torch.float8_e4m3fn)
    elif args.type == "int":
        codes = ratio.round().to(torch.int16)
    else:
        raise ARMORValueError(
            f"{key}: {args.num_bits}-bit {args.type} weights; moving scales needs int or FP8 "
            "codes: distill with parameters='wrappers'"
        )
    # the core is levels · scale rounded to the weight's dtype: a relative error of at most half
    # its epsilon, i.e. |levels| · eps / 2 in units of the scale (plus float32 division's ulps)
    levels = codes.float()
    slack = (levels.abs() * torch.finfo(weight.dtype).eps / 2 + _GRID_TOLERANCE).clamp(max=0.5)
    off = (ratio - levels).abs() - slack
    if bool((off > 0).any()):
        raise ARMORValueError(
            f"{key}'s core is off its weight_scale grid by {float(off.max()):.3g} scale units "
            "beyond rounding; distill with parameters='wrappers'"
        )
    return codes


def scale_parameters(linears: dict[str, nn.Linear]) -> tuple[list[torch.Tensor], list, _Names]:
    """A ratio ``r`` of ones per weight-quantized Linear, shaped like its ``weight_scale``.

    :return: ``(params, masks, names)`` as :func:`~.reconstruction.factor_parameters` gives them
        (masks ``None``; names ``(key, module, SCALE)``)
    (Whether their scales can move is checked when :func:`trainable_scales` installs them.)
    """
    params, names = [], []
    for key in weight_quantized(linears):
        module = linears[key]
        params.append(torch.ones_like(_scale(module), dtype=torch.float32))
        names.append((key, module, SCALE))
    return params, [None] * len(params), names


def with_scale_ratios(
    linears: dict[str, nn.Linear], moving: tuple[list[torch.Tensor], list, _Names]
) -> tuple[list[torch.Tensor], list, _Names]:
    """``moving`` (``(params, masks, names)`` of the other tensors that move, e.g. the wrappers
    from :func:`~.reconstruction.factor_parameters`), then :func:`scale_parameters` of
    ``linears``."""
    params, masks, names = moving
    ratios, ratio_masks, ratio_names = scale_parameters(linears)
    return params + ratios, masks + ratio_masks, names + ratio_names


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
    scheme = _scheme(module)
    enabled = getattr(module, "quantization_enabled", True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if enabled and scheme.input_activations is not None:
            x = _straight_through(module, x, "input", scheme.input_activations)
        y = nn.functional.linear(x, core().to(x.dtype), module.bias)
        if enabled and scheme.output_activations is not None:
            y = _straight_through(module, y, "output", scheme.output_activations)
        return y

    return forward


def _scaled_core(
    codes: torch.Tensor, scale: torch.Tensor, ratio: torch.Tensor, tiling: tuple[int, int]
) -> Callable[[], torch.Tensor]:
    """``levels · (scale ⊙ |ratio|)`` ``[m, n]``, formed at each call (``ratio`` moves)."""
    return lambda: codes.float() * _expanded(scale * ratio.abs(), tiling, codes.shape)


def _live_own_core(module: nn.Linear) -> Callable[[], torch.Tensor]:
    """:func:`_own_core` of ``module``, formed at each call."""
    return lambda: _own_core(module)


@contextmanager
def trainable_scales(modules: dict[str, nn.Linear], names: _Names, params: list) -> Iterator[None]:
    """Make every Linear of ``modules`` (quantized ones: :func:`quantized_modules`) quantize its
    input and output straight through, and compute its core as ``levels · (scale ⊙ |ratio|)``
    where ``params`` has a ratio named with :data:`SCALE` for it (gradients reach the ratio),
    else as its own forward does (fake-quantized at each call, no copy kept). Every forward comes
    back on exit, also when one fails to be replaced; weights and scales are unchanged.

    :raises ARMORValueError: a ratio for a core off its grid, quantized with activation
        ordering, or with codes that are neither integers nor FP8
    """
    ratios = {key: p for (key, _, attr), p in zip(names, params, strict=True) if attr == SCALE}
    saved = {}
    try:
        for key, module in modules.items():
            if key in ratios:
                tiling = _tiling(module, key)
                core = _scaled_core(_codes(module, key, tiling), _scale(module).float(),
                                    ratios[key], tiling)  # fmt: skip
            else:
                core = _live_own_core(module)
            saved[module] = module.__dict__.get("forward")
            setattr(module, "forward", _quantized_forward(module, core))  # noqa: B010
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                setattr(module, "forward", forward)  # noqa: B010  (an instance attribute)


def write_back_scales(names: _Names, params: list) -> None:
    """Give every module named with :data:`SCALE` the scale ``scale ⊙ |ratio|`` (in the scale's
    dtype) and the core ``levels · scale`` on it. A module whose codes would not come back from
    that core (the weight's dtype rounds ``levels · scale`` by half a step or more, e.g. 8-bit
    levels in bfloat16) keeps its scale and core, with a warning.
    """
    for (key, module, attr), ratio in zip(names, params, strict=True):
        if attr != SCALE:
            continue
        tiling = _tiling(module, key)
        codes = _codes(module, key, tiling)
        old_scale, old_weight = _scale(module).clone(), module.weight.detach().clone()
        new = (old_scale.float() * ratio.detach().abs()).to(old_scale.dtype)
        core = codes.float() * _expanded(new, tiling, codes.shape)
        with torch.no_grad():
            update_offload_parameter(module, SCALE, new)
            update_offload_parameter(module, "weight", core.to(module.weight.dtype))
        try:
            same = torch.equal(_codes(module, key, tiling), codes)
        except ARMORValueError:
            same = False
        if not same:
            with torch.no_grad():
                update_offload_parameter(module, SCALE, old_scale)
                update_offload_parameter(module, "weight", old_weight)
            logger.warning(f"{key}: its codes would change under the fitted scale in "
                           f"{module.weight.dtype}; its scale and core stay")  # fmt: skip
