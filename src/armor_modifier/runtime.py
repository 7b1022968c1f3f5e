"""Attach ARMOR wrappers to an ``nn.Linear`` whose weight is the 2:4 core.

After :func:`attach_wrappers` the Linear computes ``y = A (S (B x)) + bias``:

- a forward pre-hook applies ``B`` to the input in ``b``-sized chunks (so whatever runs inside the
  Linear's forward, e.g. a quantization wrapper's input observer, sees ``B x``);
- the Linear itself computes ``S (B x) + bias`` with its (2:4) ``weight``;
- a forward hook applies ``A`` to the output: ``A (y - bias) + bias``.

``A [p, b, b]`` and ``B [q, b, b]`` are persistent buffers ``armor_A`` / ``armor_B``, so they are
in the ``state_dict`` and move with ``.to()``. Pure torch: no framework imports.
"""

from __future__ import annotations

import torch
from torch import nn

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


def _pre_hook(module: nn.Linear, args: tuple) -> tuple:
    x, *rest = args
    return (apply_input_wrapper(x, getattr(module, ARMOR_B)), *rest)


def _post_hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return apply_output_wrapper_around_bias(output, getattr(module, ARMOR_A), module.bias)


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
    handles = [
        linear.register_forward_pre_hook(_pre_hook),
        linear.register_forward_hook(_post_hook),
    ]
    setattr(linear, _HOOKS, handles)


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
