"""The ARMOR forward ``y = A (S (B x)) + bias``, in one place, and the wrappers on an ``nn.Linear``.

Every ARMOR module of the package computes its forward with the functions here:

- a Linear whose ``weight`` is the 2:4 core (:func:`attach_wrappers`, the armor-ct loader, the
  CUDA 2:4 runtime, decoder-layer reconstruction) gets the pre/post pair of forward hooks of
  :func:`hook_wrappers`: the pre-hook applies ``B`` to the input (:func:`apply_input_wrapper`,
  so whatever runs inside the Linear's forward, e.g. a quantization wrapper's input observer,
  sees ``B x``); the Linear computes ``S (B x) + bias`` with its weight (or with another core:
  :func:`forward_with_core`); the post-hook applies ``A`` around the bias,
  ``A (y - bias) + bias`` (:func:`apply_output_wrapper_around_bias`);
- a module that computes the whole product itself (the ONNX exporter's ``FactoredLinear``) calls
  :func:`armor_forward`: ``A (S (B x)) + bias``, the bias added after ``A``.

The two orders are not the same floating-point operations (``A ((S B x + bias) - bias)`` is not
``A (S B x)`` to the last bit), so each keeps its own: the hooks' results are what every saved
model and quickstart figure was computed with, the exporter's is what its ONNX graphs hold.

``A [p, b, b]`` and ``B [q, b, b]`` are persistent buffers ``armor_A`` / ``armor_B``, so they are
in the ``state_dict`` and move with ``.to()``. Pure torch: no framework imports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from armor_modifier.core.errors import ARMORValueError

from .core.blockdiag import left_blockdiag, right_blockdiag

__all__ = [
    "ARMOR_A",
    "ARMOR_B",
    "attach_wrappers",
    "detach_wrappers",
    "is_armor_linear",
    "effective_weight",
    "apply_input_wrapper",
    "apply_output_wrapper",
    "apply_output_wrapper_around_bias",
    "armor_forward",
    "forward_with_core",
    "hook_wrappers",
]

ARMOR_A = "armor_A"
ARMOR_B = "armor_B"
_HOOKS = "_armor_hook_handles"


def apply_input_wrapper(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``blockdiag(B) @ x`` for every row vector: ``x [..., n] -> [..., n]``."""
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    return right_blockdiag(flat, B.transpose(1, 2).to(x.dtype)).reshape(x.shape)


def apply_output_wrapper(y: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``blockdiag(A) @ y`` for every row vector: ``y [..., m] -> [..., m]``."""
    m = y.shape[-1]
    flat = y.reshape(-1, m)
    return right_blockdiag(flat, A.transpose(1, 2).to(y.dtype)).reshape(y.shape)


def apply_output_wrapper_around_bias(
    y: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``A (y - bias) + bias`` for a Linear's output ``y [..., m]`` (``A y`` without bias)."""
    if bias is None:
        return apply_output_wrapper(y, A)
    bias = bias.to(y.dtype)
    return apply_output_wrapper(y - bias, A) + bias


def armor_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None,
    core: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``A (core(B x)) + bias`` for a module that computes the whole product itself.

    The bias is added after ``A`` (the hooks of :func:`hook_wrappers` instead see the Linear's
    output with its bias and compute ``A (y - bias) + bias``; see the module docstring).

    :param x: ``[..., n]``
    :param A: ``[p, b, b]`` output wrapper blocks (``p b = m``)
    :param B: ``[q, b', b']`` input wrapper blocks (``q b' = n``)
    :param bias: ``[m]`` or ``None``
    :param core: the core product without bias, ``[..., n] -> [..., m]`` (applied to ``B x``)
    :return: ``[..., m]``
    """
    y = apply_output_wrapper(core(apply_input_wrapper(x, B)), A)
    if bias is not None:
        y = y + bias
    return y


def _pre_hook(module: nn.Linear, args: tuple, B: torch.Tensor | None = None) -> tuple:
    """``B x`` for the Linear's first argument ``x [..., n]`` (``B``: the module's buffer)."""
    x, *rest = args
    return (apply_input_wrapper(x, getattr(module, ARMOR_B) if B is None else B), *rest)


def _post_hook(
    module: nn.Linear, args: tuple, output: torch.Tensor, A: torch.Tensor | None = None
) -> torch.Tensor:
    """``A (y - bias) + bias`` for the Linear's output ``y [..., m]`` (``A``: its buffer)."""
    A = getattr(module, ARMOR_A) if A is None else A
    return apply_output_wrapper_around_bias(output, A, module.bias)


def hook_wrappers(
    linear: nn.Linear, A: torch.Tensor | None = None, B: torch.Tensor | None = None
) -> list[RemovableHandle]:
    """Register the ARMOR forward hooks on ``linear``: ``B`` before, ``A`` around its output.

    :param A: ``[p, b, b]`` to apply, or ``None`` to read ``linear.armor_A`` at every call
    :param B: ``[q, b, b]`` to apply, or ``None`` to read ``linear.armor_B`` at every call
    :return: the pre-hook's and the hook's handles
    """
    pre = _pre_hook if B is None else functools.partial(_pre_hook, B=B)
    post = _post_hook if A is None else functools.partial(_post_hook, A=A)
    return [linear.register_forward_pre_hook(pre), linear.register_forward_hook(post)]


def forward_with_core(
    linear: nn.Linear, core: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``forward`` for ``linear`` computing ``core x + bias`` with ``core [m, n]`` in place of
    its weight (cast to the input's dtype), e.g. a core being trained; ``x [..., n] -> [..., m]``.
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, core.to(x.dtype), linear.bias)

    return forward


def is_armor_linear(module: nn.Module) -> bool:
    """Whether ``module`` carries ARMOR wrappers."""
    return hasattr(module, ARMOR_A) and hasattr(module, ARMOR_B)


def armor_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{name: module}`` of every Linear in ``model`` that carries ARMOR wrappers, model order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_armor_linear(module)
    }


def attach_wrappers(linear: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
    """Register ``A [p, b, b]`` and ``B [q, b, b]`` on ``linear`` and hook them into its forward.

    ``linear.weight`` must already hold the core. Re-attaching replaces the old wrappers.

    :raises ValueError: if the block shapes do not tile ``linear.weight``
    """
    m, n = linear.weight.shape
    for name, blocks, dim in (("A", A, m), ("B", B, n)):
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            raise ARMORValueError(f"{name} must be [n_blocks, b, b], got {tuple(blocks.shape)}")
        if blocks.shape[0] * blocks.shape[1] != dim:
            raise ARMORValueError(
                f"{name} {tuple(blocks.shape)} does not tile dimension {dim} of the weight {m}x{n}"
            )
    detach_wrappers(linear)
    dtype, device = linear.weight.dtype, linear.weight.device
    if not dtype.is_floating_point:
        dtype = torch.float32
    linear.register_buffer(ARMOR_A, A.detach().to(device=device, dtype=dtype).contiguous())
    linear.register_buffer(ARMOR_B, B.detach().to(device=device, dtype=dtype).contiguous())
    setattr(linear, _HOOKS, hook_wrappers(linear))


def detach_wrappers(linear: nn.Linear) -> None:
    """Remove ARMOR hooks and buffers from ``linear`` (its weight stays the core)."""
    for handle in getattr(linear, _HOOKS, []):
        handle.remove()
    if hasattr(linear, _HOOKS):
        delattr(linear, _HOOKS)
    for name in (ARMOR_A, ARMOR_B):
        if name in linear._buffers:
            del linear._buffers[name]


def effective_weight(linear: nn.Linear) -> torch.Tensor:
    """The dense ``A · core · B`` of an ARMOR Linear (fp32), ``[m, n]``."""
    core = linear.weight.detach().float()
    A = getattr(linear, ARMOR_A).float()
    B = getattr(linear, ARMOR_B).float()
    return right_blockdiag(left_blockdiag(A, core), B)
