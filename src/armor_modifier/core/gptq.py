"""GPTQ that keeps a sparsity mask (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1), pure torch.

Glossary: ``W [m, n]`` weight, ``M [m, n]`` bool mask of the kept entries, ``H [n, n]`` the layer
Hessian ``X^T X / N`` (any positive scale), ``U [n, n]`` the upper Cholesky factor of
``(H + lambda I)^-1`` with ``lambda = dampening_frac * mean(diag H)``, ``B`` the columns per lazy
block (``block_size``), ``Q [m, n]`` the result, ``E [m, n]`` the scaled errors.

Columns are visited left to right (no activation reordering). Column ``j`` is fake-quantized and
masked, ``q = quantize(w) * M[:, j]``; its scaled error ``err = (w - q) / U_jj`` is spread over
the not yet visited columns through row ``j`` of ``U``: inside the block at once, to the later
blocks in one product per block (GPTQ's lazy batch updates).

**The mask.** This is GPTQ whose quantizer maps pruned entries to 0, the way SparseGPT quantizes
jointly with a mask: an error update may land on an entry that is pruned in a later column; it
is carried there and compensated again (through ``U``) when that column is set to 0. The result
is exactly 0 off ``M`` and only kept entries change. Dropping such updates instead (masking
every update) keeps the same zeros but gives up compensation: on the correlated inputs of
``tests/test_gptq_core.py`` it left 20-40 % more output error (on milder ones, at times more than
round-to-nearest).

**The loss.** Column ``j``'s final value satisfies ``W_j - Q_j = sum_{i <= j} E_i U_ij``, so
``W - Q = E U`` and, with ``U^T U = (H + lambda I)^-1``,
``sum(E^2) = tr((W - Q) (H + lambda I) (W - Q)^T)``: the reported loss is the damped layer
objective itself. (GPTQ's code and llm-compressor report half of it.)

**Group grids.** With ``fit_group`` and ``group_size``, the grid of each group of
``group_size`` columns is fitted when the sweep reaches the group's first column, from the
group's columns as compensated so far (masked), as the GPTQ paper's code does without
``static_groups``. A grid fixed from the weight before GPTQ cannot follow the compensation: on
SmolLM2's last ``down_proj`` (2:4, int4 in groups of 64) the compensated weights left the fixed
range and were clamped, and GPTQ's output error on its own calibration inputs ended above
round-to-nearest's (docs/benchmark_gptq.md).

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
) -> GPTQResult:
    """GPTQ of one weight that keeps its zeros: a 2:4 core stays 2:4.

    Computed in float32 on ``W``'s device; nothing passed in is modified.

    :param W: ``[m, n]`` any float dtype
    :param H: ``[n, n]`` Hessian of the layer's inputs (only its lower triangle and diagonal are
        read)
    :param quantize: ``(columns [m, k] float32, index of the first column) -> [m, k]``
        fake-quantized columns on a grid fixed before the call; must map 0 to 0
    :param mask: bool ``[m, n]`` entries allowed to be non-zero; default ``W != 0``
    :param block_size: columns per lazy-update block (GPTQ's ``B``); the result depends on it
        only through rounding. With ``fit_group`` it is rounded up to a multiple of
        ``group_size``, so that every group's columns are up to date when it is fitted
    :param dampening_frac: ``lambda / mean(diag H)``, multiplied by ``DAMPING_GROWTH`` up to
        ``MAX_DAMPING_INCREASES`` times while a Cholesky factorisation fails
    :param fit_group: called at the first column of every group of ``group_size`` columns, before
        ``quantize`` sees them (see "Group grids" above); ``None``: the grid is fixed
    :param group_size: columns per grid group; required with ``fit_group`` only
    :raises HessianNotPositiveDefinite: when every damping tried fails
    :raises ARMORValueError: on a bad shape, value or setting, or a non-finite quantizer output
    """
    Wf, M = _check_inputs(W, mask, quantize, block_size, dampening_frac)
    block_size = _check_group_fitting(fit_group, group_size, block_size)
    n = Wf.shape[1]
    Hf = check_hessian(H.to(Wf.device) if isinstance(H, torch.Tensor) else H, n, symmetrize=False)
    dead = Hf.diagonal() == 0
    Hf[dead, dead] = 1.0
    U, _, increases = inverse_hessian_factor(Hf, dampening_frac, MAX_DAMPING_INCREASES)

    Q = torch.zeros_like(Wf)
    loss = torch.zeros((), dtype=torch.float32, device=Wf.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Q1, E1 = _quantize_block(
            Wf[:, i1:i2].clone(), U[i1:i2, i1:i2], M[:, i1:i2], quantize, i1, fit_group, group_size
        )
        Q[:, i1:i2] = Q1
        Wf[:, i2:] -= E1 @ U[i1:i2, i2:]
        loss += E1.square().sum()
    if not bool(torch.isfinite(Q).all()):
        raise ARMORValueError(
            f"quantize returned {int((~torch.isfinite(Q)).sum())} NaN/Inf values; "
            "give it finite, non-zero scales"
        )
    return GPTQResult(weight=Q, loss=float(loss), num_damping_increases=increases)


def _quantize_block(
    W1: torch.Tensor,
    U1: torch.Tensor,
    M1: torch.Tensor,
    quantize: Quantizer,
    i1: int,
    fit_group: GroupFitter | None,
    group_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep one block column by column (Algorithm 1's inner loop).

    :param W1: ``[m, c]`` the block's current columns (updated in place)
    :param U1: ``[c, c]`` the block's diagonal block of ``U``
    :param M1: bool ``[m, c]`` the block's mask
    :param i1: index of the block's first column in ``W`` (a multiple of ``group_size`` when
        ``fit_group`` is given)
    :return: (``Q1 [m, c]`` quantized masked columns, ``E1 [m, c]`` scaled errors)
    """
    Q1 = torch.zeros_like(W1)
    E1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        if fit_group is not None and group_size is not None and i % group_size == 0:
            fit_group((W1[:, i : i + group_size] * M1[:, i : i + group_size]).clone(), i1 + i)
        w = W1[:, i : i + 1]
        q = quantize(w.clone(), i1 + i)
        if not isinstance(q, torch.Tensor) or q.shape != w.shape:
            got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ARMORValueError(
                f"quantize returned {got} for columns of shape {tuple(w.shape)}; it must return "
                "a tensor of the same shape"
            )
        q = torch.where(M1[:, i : i + 1], q.to(W1.dtype), 0.0)
        err = (w - q) / U1[i, i]
        W1[:, i + 1 :] -= err * U1[i, i + 1 :]
        Q1[:, i : i + 1] = q
        E1[:, i : i + 1] = err
    return Q1, E1


def _check_group_fitting(
    fit_group: object, group_size: object, block_size: int
) -> int:
    """Validate ``fit_group`` / ``group_size``; return the block size to use."""
    if fit_group is None:
        return block_size
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
    return -(-block_size // group_size) * group_size


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
