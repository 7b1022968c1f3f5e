"""SparseGPT 2:4 (Frantar & Alistarh 2023, arXiv 2301.00774), pure torch.

Glossary: ``W [m, n]`` weight, ``H [n, n]`` the layer Hessian ``X^T X / N`` (llm-compressor
accumulates ``2 X^T X / N``; the scale is irrelevant), ``U [n, n]`` the upper Cholesky factor of
``(H + lambda I)^-1``, ``lambda = dampening_frac * mean(diag H)``.

The columns are swept left to right in blocks of ``blocksize``. At the first column of every
4-group the 2 entries with the smallest OBS saliency ``w^2 / U_jj^2`` of each row are pruned; each
column's error ``(w - q) / U_jj`` is then spread over the not yet visited columns through row ``j``
of ``U`` (inside the block at once, to the later blocks lazily). This is the same algorithm as
llm-compressor's ``sparsify_weight`` with ``prune_n=2, prune_m=4``, written independently.

Unlike llm-compressor, a Hessian that stays singular after damping is not silently replaced by the
identity: the damping is multiplied by 10 a bounded number of times, then
:class:`HessianNotPositiveDefinite` is raised so the caller can keep another solution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ARMORTypeError, ARMORValueError, HessianNotPositiveDefinite
from .linalg import lower_triangular_inverse
from .problem import all_finite, check_weight

__all__ = [
    "HessianNotPositiveDefinite",
    "SparseGPTResult",
    "check_hessian",
    "inverse_hessian_factor",
    "sparsegpt_2of4",
    "sparsegpt_prune",
]

MAX_DAMPING_INCREASES = 5
DAMPING_GROWTH = 10.0


@dataclass(frozen=True)
class SparseGPTResult:
    """Output of :func:`sparsegpt_prune`.

    :ivar weight: ``[m, n]`` float32 pruned and updated weight (zeros off ``mask``)
    :ivar mask: bool ``[m, n]`` kept entries, exactly 2 of every 4 consecutive columns per row
    :ivar damping: the ``lambda`` finally added to ``diag(H)``
    :ivar num_damping_increases: how often ``lambda`` had to be multiplied by 10
    """

    weight: torch.Tensor
    mask: torch.Tensor
    damping: float
    num_damping_increases: int


def check_hessian(H: object, n: int, *, symmetrize: bool = True) -> torch.Tensor:
    """Validate a layer Hessian and return an fp32 copy (the caller's tensor is never modified).

    :param H: ``[n, n]`` floating, finite
    :param n: the weight's ``in_features``
    :param symmetrize: return ``(H + H^T) / 2``
    :return: ``[n, n]`` float32
    """
    if not isinstance(H, torch.Tensor):
        raise ARMORTypeError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if H.shape != (n, n):
        raise ARMORValueError(
            f"H must have shape [{n}, {n}] (in_features x in_features), got {tuple(H.shape)}"
        )
    if not H.is_floating_point():
        raise ARMORTypeError(f"H must be a floating tensor, got dtype {H.dtype}")
    H = H.detach().to(torch.float32)
    if not all_finite(H):
        bad = int((~torch.isfinite(H)).sum())
        raise ARMORValueError(
            f"H holds {bad} NaN/Inf entries; accumulate the Hessian in float32 or float64"
        )
    # (H + H^T) * 0.5 is (H + H^T) / 2 to the bit, without a second n x n temporary
    return (H + H.T).mul_(0.5) if symmetrize else H.clone()


def inverse_hessian_factor(
    H: torch.Tensor,
    dampening_frac: float = 0.01,
    max_increases: int = MAX_DAMPING_INCREASES,
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` with bounded damping increases.

    ``lambda = dampening_frac * 10^k * mean(diag H)`` for the first ``k = 0, 1, ..., max_increases``
    at which the Cholesky factorisation succeeds and ``U`` is finite.

    :param H: ``[n, n]`` float32 (only its lower triangle is read)
    :return: (``U [n, n]``, ``lambda``, ``k``)
    :raises HessianNotPositiveDefinite: when every ``k`` fails
    """
    if not dampening_frac > 0:
        raise ARMORValueError(
            f"dampening_frac must be > 0 (SparseGPT uses 0.01), got {dampening_frac!r}"
        )
    mean_diag = float(H.diagonal().mean())
    for k in range(max_increases + 1):
        damping = dampening_frac * DAMPING_GROWTH**k * mean_diag
        # With J the reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is
        # upper triangular with a positive diagonal: the upper Cholesky factor of H^-1. One
        # factorisation and one triangular inverse, less than half the time of inverting H and
        # factorising the inverse, and as accurate (docs/results.md, layer scaling).
        # (transposed too, so the factorisation reads H's lower triangle, as documented; the
        # reversal keeps the diagonal on the diagonal, so lambda goes onto the reversed copy)
        J_H_J = H.flip(0, 1)
        J_H_J.diagonal().add_(damping)
        L, info = torch.linalg.cholesky_ex(J_H_J.T)
        del J_H_J
        if int(info) != 0:
            continue
        U = lower_triangular_inverse(L).flip(0, 1)
        if all_finite(U):
            return U, damping, k
    raise HessianNotPositiveDefinite(
        f"H + lambda I is not positive definite for lambda up to "
        f"{dampening_frac * DAMPING_GROWTH**max_increases:g} * mean(diag H) "
        f"(mean diag {mean_diag:g}); "
        "calibrate on more tokens or check the Hessian accumulation"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    blocksize: int = 128,
    dampening_frac: float = 0.01,
    max_damping_increases: int = MAX_DAMPING_INCREASES,
) -> SparseGPTResult:
    """SparseGPT 2:4 pruning of one weight.

    Columns whose ``H_jj`` is zero never see a non-zero input: they are zeroed (as llm-compressor
    does) and their Hessian diagonal set to 1.

    :param weight: ``[m, n]`` any float dtype (never modified)
    :param H: ``[n, n]`` the layer Hessian (never modified)
    :param blocksize: columns per lazy-update block, a multiple of 4
    :param dampening_frac: ``lambda`` as a fraction of ``mean(diag H)``
    :param max_damping_increases: how often ``lambda`` may be multiplied by 10
    :raises HessianNotPositiveDefinite: see :func:`inverse_hessian_factor`
    """
    W = check_weight(weight)
    m, n = W.shape
    H = check_hessian(H, n, symmetrize=False)
    if not isinstance(blocksize, int) or blocksize < 4 or blocksize % 4:
        raise ARMORValueError(
            f"blocksize must be a positive multiple of 4 (2:4 groups must not straddle blocks), "
            f"got {blocksize!r}; SparseGPT uses 128"
        )
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, damping, increases = inverse_hessian_factor(H, dampening_frac, max_damping_increases)

    keep = torch.ones(m, n, dtype=torch.bool, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        Q1, Err1 = _prune_block(W[:, i1:i2].clone(), U[i1:i2, i1:i2], keep[:, i1:i2])
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return SparseGPTResult(weight=W, mask=keep, damping=damping, num_damping_increases=increases)


def _prune_block(
    W1: torch.Tensor, U1: torch.Tensor, keep1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep one column block: choose 2:4 supports, prune to them, spread the errors.

    Column ``j``'s error reaches the later columns of its own 4-group at once and the rest of the
    block after the group (the same sums as updating every later column per column).

    :param W1: ``[m, c]`` the block's current columns (updated in place)
    :param U1: ``[c, c]`` the block's diagonal block of ``U``
    :param keep1: bool ``[m, c]`` view into the kept mask (written in place)
    :return: (``Q1 [m, c]`` pruned columns, ``Err1 [m, c]`` scaled errors)
    """
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    d = U1.diagonal()
    for i in range(0, W1.shape[1], 4):
        Wg = W1[:, i : i + 4]
        saliency = Wg.square() / d[i : i + 4].square()
        pruned = torch.topk(saliency, 2, dim=1, largest=False).indices
        keep1[:, i : i + 4].scatter_(1, pruned, False)
        for j in range(4):
            w = Wg[:, j]
            q = torch.where(keep1[:, i + j], w, torch.zeros_like(w))
            err = (w - q) / d[i + j]
            Wg[:, j:] -= err[:, None] * U1[i + j, i + j : i + 4][None, :]
            Q1[:, i + j] = q
            Err1[:, i + j] = err
        W1[:, i + 4 :] -= Err1[:, i : i + 4] @ U1[i : i + 4, i + 4 :]
    return Q1, Err1


def sparsegpt_2of4(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    blocksize: int = 128,
    dampening_frac: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT 2:4: ``(pruned_weight [m, n] float32, mask [m, n] bool)``.

    See :func:`sparsegpt_prune` (which also reports the damping used).

    :raises HessianNotPositiveDefinite: when ``H`` stays singular after the damping increases
    """
    result = sparsegpt_prune(weight, H, blocksize=blocksize, dampening_frac=dampening_frac)
    return result.weight, result.mask
