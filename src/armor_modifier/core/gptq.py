"""GPTQ that keeps a sparsity mask (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1), pure torch.

Glossary: ``W [m, n]`` weight, ``M [m, n]`` bool mask of the kept entries, ``H [n, n]`` the layer
Hessian ``X^T X / N`` (any positive scale), ``U [n, n]`` the upper Cholesky factor of
``(H + lambda I)^-1`` with ``lambda = dampening_frac * mean(diag H)``, ``B`` the columns per lazy
block (``block_size``), ``Q [m, n]`` the result, ``E [m, n]`` the scaled errors.

Columns are visited left to right, or in a given ``order`` (GPTQ's activation order: the
columns with the largest ``H_jj`` first, so that the later ones compensate their error; the mask
is per entry, so any order keeps it). Column ``j`` is fake-quantized and masked,
``q = quantize(w) * M[:, j]``; its scaled error ``err = (w - q) / U_jj`` is spread over the not
yet visited columns through row ``j`` of ``U``: inside the block at once, to the later
blocks in one product per block (GPTQ's lazy batch updates).

**The mask.** This is GPTQ whose quantizer maps pruned entries to 0, the way SparseGPT quantizes
jointly with a mask: an error update may land on an entry that is pruned in a later column; it
is carried there and compensated again (through ``U``) when that column is set to 0. The result
is exactly 0 off ``M`` and only kept entries change. Dropping such updates instead (masking
every update) keeps the same zeros but gives up compensation, and leaves more output error
(``tests/test_gptq_core.py`` compares both).

**The loss.** Column ``j``'s final value satisfies ``W_j - Q_j = sum_{i <= j} E_i U_ij``, so
``W - Q = E U`` and, with ``U^T U = (H + lambda I)^-1``,
``sum(E^2) = tr((W - Q) (H + lambda I) (W - Q)^T)``: the reported loss is the damped layer
objective itself. (GPTQ's code and llm-compressor report half of it.)

**Group grids.** With ``fit_group`` and ``group_size``, the grid of each group of
``group_size`` columns is fitted when the sweep first reaches one of its columns, from the
group's columns as compensated so far (masked), as the GPTQ paper's code does without
``static_groups``. A grid fixed from the weight before GPTQ cannot follow the compensation: the
compensated weights can leave the fixed range and be clamped (docs/results.md#gptq_layer_check).

Columns with ``H_jj == 0`` saw no input; as in GPTQ their ``H_jj`` is set to 1, which decouples
them in ``U``, so they are rounded to nearest (and masked) and pass no error on. Unlike GPTQ they
are not zeroed: an input unseen in calibration may still occur.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ARMORTypeError, ARMORValueError
from .problem import check_weight
from .sparsegpt import MAX_DAMPING_INCREASES, check_hessian, inverse_hessian_factor

__all__ = ["GPTQResult", "masked_gptq"]

Quantizer = Callable[[torch.Tensor, int], torch.Tensor]
#: ``(columns [m, g] float32 as compensated so far and masked, index of the first column)``:
#: fits the grid ``quantize`` then uses for those columns
GroupFitter = Callable[[torch.Tensor, int], None]


@dataclass(frozen=True)
class GPTQResult:
    """Output of :func:`masked_gptq`.

    :ivar weight: ``[m, n]`` float32 fake-quantized values on the mask, exact zeros off it
    :ivar loss: ``sum_j ||err_j||^2 = tr((W - Q) (H + lambda I) (W - Q)^T)``, ``err_j`` GPTQ's
        scaled error ``(w_j - q_j) / U_jj`` (twice the number GPTQ's code prints)
    :ivar num_damping_increases: how often ``lambda`` had to be multiplied by ``DAMPING_GROWTH``
    """

    weight: torch.Tensor
    loss: float
    num_damping_increases: int


def masked_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    quantize: Quantizer,
    *,
    mask: torch.Tensor | None = None,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    fit_group: GroupFitter | None = None,
    group_size: int | None = None,
    order: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ of one weight that keeps its zeros: a 2:4 core stays 2:4.

    Computed in float32 on ``W``'s device; nothing passed in is modified.

    :param W: ``[m, n]`` any float dtype
    :param H: ``[n, n]`` Hessian of the layer's inputs (only its lower triangle and diagonal are
        read)
    :param quantize: ``(columns [m, k] float32, index of the first column) -> [m, k]``
        fake-quantized columns on the current grid; must map 0 to 0. Called one column at a
        time, with the column's index in ``W``
    :param mask: bool ``[m, n]`` entries allowed to be non-zero; default ``W != 0``
    :param block_size: columns per lazy-update block (GPTQ's ``B``); the result depends on it
        only through rounding
    :param dampening_frac: ``lambda / mean(diag H)``, multiplied by ``DAMPING_GROWTH`` up to
        ``MAX_DAMPING_INCREASES`` times while a Cholesky factorisation fails
    :param fit_group: called when the sweep reaches the first column of a group of
        ``group_size`` columns (``[g * group_size, (g + 1) * group_size)`` of ``W``), before
        ``quantize`` sees it (see "Group grids" above); ``None``: the grid is fixed
    :param group_size: columns per grid group; required with ``fit_group`` only
    :param order: int ``[n]`` permutation: the order in which columns are visited (GPTQ's
        activation order is ``argsort(diag(H), descending=True)``); default left to right. The
        result is in ``W``'s column order; the mask and the groups are those of ``W``
    :raises HessianNotPositiveDefinite: when every damping tried fails
    :raises ARMORValueError: on a bad shape, value or setting, or a non-finite quantizer output
    """
    Wf, M = _check_inputs(W, mask, quantize, block_size, dampening_frac)
    _check_group_fitting(fit_group, group_size)
    n = Wf.shape[1]
    perm = _check_order(order, n, Wf.device)
    Hf = check_hessian(H.to(Wf.device) if isinstance(H, torch.Tensor) else H, n, symmetrize=False)
    dead = Hf.diagonal() == 0
    Hf[dead, dead] = 1.0
    lower = Hf.tril()
    Hp = (lower + lower.T - torch.diag(Hf.diagonal()))[perm][:, perm]
    U, _, increases = inverse_hessian_factor(Hp, dampening_frac, MAX_DAMPING_INCREASES)

    sweep = _Sweep(Wf[:, perm].clone(), M[:, perm], U, perm, quantize, fit_group, group_size)
    Q = torch.zeros_like(Wf)
    loss = torch.zeros((), dtype=torch.float32, device=Wf.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Q1, E1 = sweep.block(i1, i2)
        Q[:, perm[i1:i2]] = Q1
        sweep.W[:, i2:] -= E1 @ U[i1:i2, i2:]
        loss += E1.square().sum()
    if not bool(torch.isfinite(Q).all()):
        raise ARMORValueError(
            f"quantize returned {int((~torch.isfinite(Q)).sum())} NaN/Inf values; "
            "give it finite, non-zero scales"
        )
    return GPTQResult(weight=Q, loss=float(loss), num_damping_increases=increases)


class _Sweep:
    """Algorithm 1's state in visiting order: ``W [m, n]`` the columns permuted by ``perm``
    (updated as the sweep goes), ``M`` the mask likewise, ``U`` of the permuted Hessian."""

    def __init__(
        self,
        W: torch.Tensor,
        M: torch.Tensor,
        U: torch.Tensor,
        perm: torch.Tensor,
        quantize: Quantizer,
        fit_group: GroupFitter | None,
        group_size: int | None,
    ) -> None:
        self.W, self.M, self.U, self.perm = W, M, U, perm
        self.position = torch.argsort(perm)  # column of W -> its place in the visiting order
        self.quantize, self.fit_group, self.group_size = quantize, fit_group, group_size
        self.fitted: set[int] = set()

    def block(self, i1: int, i2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sweep visiting positions ``i1 .. i2 - 1`` column by column (Algorithm 1's inner loop).

        :return: (``Q1 [m, i2 - i1]`` quantized masked columns, ``E1 [m, i2 - i1]`` scaled errors)
        """
        W1 = self.W[:, i1:i2].clone()
        U1 = self.U[i1:i2, i1:i2]
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            column = int(self.perm[i1 + i])
            self._fit_group_of(column, W1, E1, i1, i)
            w = W1[:, i : i + 1]
            q = self.quantize(w.clone(), column)
            if not isinstance(q, torch.Tensor) or q.shape != w.shape:
                got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
                raise ARMORValueError(
                    f"quantize returned {got} for columns of shape {tuple(w.shape)}; it must "
                    "return a tensor of the same shape"
                )
            q = torch.where(self.M[:, i1 + i : i1 + i + 1], q.to(W1.dtype), 0.0)
            err = (w - q) / U1[i, i]
            W1[:, i + 1 :] -= err * U1[i, i + 1 :]
            Q1[:, i : i + 1] = q
            E1[:, i : i + 1] = err
        return Q1, E1

    def _fit_group_of(
        self, column: int, W1: torch.Tensor, E1: torch.Tensor, i1: int, i: int
    ) -> None:
        """Fit the grid of ``column``'s group when the sweep first reaches the group, from its
        columns' current values: inside the block ``W1`` holds them; after it, the block's
        updates so far (``E1[:, :i] U[i1:i1+i, p]``) are not applied yet and are added here."""
        if self.fit_group is None or self.group_size is None:
            return
        group = column // self.group_size
        if group in self.fitted:
            return
        self.fitted.add(group)
        first = group * self.group_size
        places = self.position[first : first + self.group_size]
        current = torch.empty(W1.shape[0], places.numel(), dtype=W1.dtype, device=W1.device)
        inside = places < i1 + W1.shape[1]
        current[:, inside] = W1[:, places[inside] - i1]
        later = places[~inside]
        current[:, ~inside] = self.W[:, later] - E1[:, :i] @ self.U[i1 : i1 + i, later]
        self.fit_group(current * self.M[:, places], first)


def _check_order(order: object, n: int, device: torch.device) -> torch.Tensor:
    """``order`` as a permutation of ``range(n)`` on ``device`` (``None``: left to right)."""
    if order is None:
        return torch.arange(n, device=device)
    if (
        not isinstance(order, torch.Tensor)
        or order.dtype.is_floating_point
        or order.dtype == torch.bool
        or order.shape != (n,)
        or not torch.equal(torch.sort(order.cpu()).values, torch.arange(n))
    ):
        got = tuple(order.shape) if isinstance(order, torch.Tensor) else type(order).__name__
        raise ARMORValueError(
            f"order must be an integer permutation of the {n} columns, got {got}; use "
            "torch.argsort(H.diagonal(), descending=True) for GPTQ's activation order"
        )
    return order.to(device=device, dtype=torch.long)


def _check_group_fitting(fit_group: object, group_size: object) -> None:
    """Validate ``fit_group`` / ``group_size``."""
    if fit_group is None:
        return
    if not callable(fit_group):
        raise ARMORTypeError(
            f"fit_group must be a callable (columns [m, g], first column) -> None or None, "
            f"got {type(fit_group).__name__}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ARMORValueError(
            f"fit_group needs group_size, the columns per grid group (an int >= 1), "
            f"got {group_size!r}"
        )


def _check_inputs(
    W: object,
    mask: object,
    quantize: object,
    block_size: object,
    dampening_frac: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate everything but ``H``; return fp32 copies of ``W [m, n]`` and ``mask [m, n]``."""
    Wf = check_weight(W, "W", multiple_of_4=False, purpose="quantizing")
    if mask is None:
        M = Wf != 0
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ARMORTypeError(f"mask must be a bool tensor, got {got}; pass `W != 0` or None")
    elif mask.shape != Wf.shape:
        raise ARMORValueError(
            f"mask must have W's shape {tuple(Wf.shape)}, got {tuple(mask.shape)}"
        )
    else:
        M = mask.detach().to(Wf.device)
    if not callable(quantize):
        raise ARMORTypeError(
            f"quantize must be a callable (columns [m, k], first column) -> [m, k], "
            f"got {type(quantize).__name__}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ARMORValueError(f"block_size must be an int >= 1 (GPTQ uses 128), got {block_size!r}")
    if (
        isinstance(dampening_frac, bool)
        or not isinstance(dampening_frac, int | float)
        or not math.isfinite(dampening_frac)
        or dampening_frac <= 0
    ):
        raise ARMORValueError(
            f"dampening_frac must be a finite number > 0 (GPTQ uses 0.01), got {dampening_frac!r}"
        )
    return Wf, M
