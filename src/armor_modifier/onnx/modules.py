"""Export-friendly stand-ins for an ARMOR Linear: factored (B, 2:4 core, A) or folded (dense).

The runtime's hooks (``armor_modifier.runtime``) do not survive tracing in a form that keeps the
core apart, so the exporter swaps every ARMOR Linear for :class:`FactoredLinear`, whose forward is
plain tensor algebra with the core used as stored: ``core [m, n]`` is the left operand of one
``MatMul`` (never transposed, so no exporter folds a transpose into the initializer and its 2:4
groups stay along the input dimension, the last axis). Pure torch.
"""

from __future__ import annotations

import torch
from torch import nn

from armor_modifier.runtime import (
    ARMOR_A,
    ARMOR_B,
    armor_forward,
    armor_linears,
    effective_weight,
)

__all__ = ["CORE", "FactoredLinear", "fold_armor_linears", "factor_armor_linears"]

#: name of the core parameter of :class:`FactoredLinear` (initializers end with ``.core``)
CORE = "core"


class FactoredLinear(nn.Module):
    """``y = blockdiag(A) · core · blockdiag(B) · x + bias`` with the three factors kept apart.

    :param core: ``[m, n]`` the 2:4 core (``nn.Linear.weight`` of the ARMOR Linear)
    :param A: ``[p, b, b]`` output wrapper blocks (``p b = m``)
    :param B: ``[q, b', b']`` input wrapper blocks (``q b' = n``)
    :param bias: ``[m]`` or ``None``
    """

    def __init__(
        self, core: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.core = nn.Parameter(core.detach().clone(), requires_grad=False)
        self.wrapper_A = nn.Parameter(A.detach().clone(), requires_grad=False)
        self.wrapper_B = nn.Parameter(B.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., n] -> [..., m]``: the runtime's :func:`~armor_modifier.runtime.armor_forward`
        on the rows of ``x``, with :meth:`core_product` as the core."""
        m, n = self.core.shape
        y = armor_forward(
            x.reshape(-1, n), self.wrapper_A, self.wrapper_B, self.bias, self.core_product
        )
        return y.reshape(*x.shape[:-1], m)

    def core_product(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [N, n] -> [N, m]``: ``(core · rowsᵀ)ᵀ``, the core as the left operand."""
        return torch.matmul(self.core, rows.transpose(0, 1)).transpose(0, 1)


def factor_armor_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every ARMOR Linear of ``model`` by a :class:`FactoredLinear` in ``dtype``, in place.

    :return: the replaced module names, model order
    """
    linears = armor_linears(model)
    for name, linear in linears.items():
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        factored = FactoredLinear(
            linear.weight.detach().to(dtype),
            getattr(linear, ARMOR_A).to(dtype),
            getattr(linear, ARMOR_B).to(dtype),
            bias,
        )
        model.set_submodule(name, factored)
    return list(linears)


def fold_armor_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every ARMOR Linear by a plain ``nn.Linear`` holding ``A · core · B``, in place.

    :return: the replaced module names, model order
    """
    linears = armor_linears(model)
    for name, linear in linears.items():
        dense = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(effective_weight(linear))
            if linear.bias is not None:
                dense.bias.copy_(linear.bias.float())
        model.set_submodule(name, dense.to(dtype).requires_grad_(False))
    return list(linears)
