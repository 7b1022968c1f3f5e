"""The exact discrete step for one 4-group (docs/algorithm.md, "Block coordinate descent"), batched.

For a group with new values ``s [4]`` the loss of its tile is, up to a constant,

    f(s) = 2 s^T g + aa * s^T G4 s

with ``g [4]`` the gradient term, ``G4 [4, 4]`` the Gram matrix of the group's rows of the right
factor and ``aa = ||a||^2`` the squared norm of the left factor's column. Restricted to a support
``P`` (2 of the 4 positions) the minimiser is ``s_P = -G4[P,P]^-1 g_P / aa`` with value
``-g_P^T G4[P,P]^-1 g_P / aa``. The step takes the best of the 6 supports, and keeps the old
values wherever they are at least as good, so it never raises the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sparsity import SUPPORTS

__all__ = ["GroupUpdate", "best_two_of_four", "joint_or_best"]

RELATIVE_DAMPING = 1e-6


@dataclass(frozen=True)
class GroupUpdate:
    """Result of :func:`best_two_of_four` for ``T`` groups.

    :ivar values: ``[T, 4]`` new values (zero off the support)
    :ivar mask: bool ``[T, 4]``, exactly 2 ``True`` per row
    :ivar changed: bool ``[T]``, whether the group took new values
    :ivar fallbacks: number of groups whose every 2x2 system was singular or whose left-factor
        column was zero (those keep their old values)
    """

    values: torch.Tensor
    mask: torch.Tensor
    changed: torch.Tensor
    fallbacks: int


def best_two_of_four(
    g: torch.Tensor,
    G4: torch.Tensor,
    aa: torch.Tensor,
    old_values: torch.Tensor,
    old_mask: torch.Tensor,
) -> GroupUpdate:
    """Best 2-of-4 support and values for ``T`` independent groups.

    :param g: ``[T, 4]``
    :param G4: ``[T, 4, 4]`` symmetric positive semi-definite
    :param aa: ``[T]`` non-negative
    :param old_values: ``[T, 4]`` current values (zero off the old support)
    :param old_mask: bool ``[T, 4]`` current support
    """
    i, j = SUPPORTS[:, 0].to(g.device), SUPPORTS[:, 1].to(g.device)
    damp = RELATIVE_DAMPING * G4.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True)  # [T, 1]
    gii, gjj, gij = G4[:, i, i] + damp, G4[:, j, j] + damp, G4[:, i, j]  # [T, 6]
    det = gii * gjj - gij * gij
    vi, vj = g[:, i], g[:, j]  # [T, 6]
    # Solve [[gii, gij], [gij, gjj]] x = -[vi, vj] with the explicit 2x2 inverse.
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    xi = -(gjj * vi - gij * vj) / safe_det
    xj = -(gii * vj - gij * vi) / safe_det
    # cost_P = -g_P^T G_P^-1 g_P / aa
    cost = (vi * xi + vj * xj) / aa.clamp_min(torch.finfo(g.dtype).tiny)[:, None]
    valid = (det > 0) & torch.isfinite(cost)
    cost = torch.where(valid, cost, torch.full_like(cost, float("inf")))
    best = cost.argmin(-1)  # [T]
    best_cost = cost.gather(-1, best[:, None]).squeeze(-1)

    old_cost = 2 * (old_values * g).sum(-1) + aa * torch.einsum(
        "tc,tcd,td->t", old_values, G4, old_values
    )
    usable = (aa > 0) & valid.any(-1)
    changed = usable & (best_cost < old_cost)

    new_values = torch.zeros_like(g)
    rows = torch.arange(g.shape[0], device=g.device)
    new_values[rows, i[best]] = xi.gather(-1, best[:, None]).squeeze(-1)
    new_values[rows, j[best]] = xj.gather(-1, best[:, None]).squeeze(-1)
    new_values = new_values / aa.clamp_min(torch.finfo(g.dtype).tiny)[:, None]
    new_mask = torch.zeros_like(old_mask)
    new_mask[rows, i[best]] = True
    new_mask[rows, j[best]] = True

    values = torch.where(changed[:, None], new_values, old_values)
    mask = torch.where(changed[:, None], new_mask, old_mask)
    return GroupUpdate(values=values, mask=mask, changed=changed, fallbacks=int((~usable).sum()))


def joint_or_best(
    a3: torch.Tensor,
    d3: torch.Tensor,
    deltaH: torch.Tensor,
    u: torch.Tensor,
    changed: torch.Tensor,
    single: torch.Tensor,
) -> torch.Tensor:
    """Which tiles' group updates to apply: per row block all of them or only its best one.

    Used by the output objective's discrete step (:meth:`~.output.OutputObjective.discrete_step`).

    The change of ``tr(E H E^T)`` from ``E_I += sum_K a_K delta_K`` (``delta_K`` on the columns
    of ``K``) is ``2 sum_K u_K . delta_K + sum_{K,L} (a_K . a_L)(delta_K H_KL delta_L)``.

    :param a3: ``[p, q, b]`` the groups' left-factor columns
    :param d3: ``[p, q, b]`` row change per unit of ``a`` (zero where not ``changed``)
    :param deltaH: ``[p, q, n]`` ``delta_K^T H_K:``
    :param u: ``[T, b]``
    :param changed: bool ``[T]`` tiles whose group improves on its own
    :param single: ``[T]`` each group's own loss change
    :return: bool ``[T]``
    """
    p, q, b = a3.shape
    cross = torch.einsum("pkjc,pjc->pkj", deltaH.reshape(p, q, q, b), d3)  # [p, q, q]
    gram = torch.einsum("pkr,pjr->pkj", a3, a3)
    joint = 2 * (u.reshape(p, q, b) * d3).sum((1, 2)) + (gram * cross).sum((1, 2))
    gain = torch.where(changed, single, torch.zeros_like(single)).reshape(p, q)
    best_gain, best = gain.min(-1)
    only_best = torch.zeros_like(gain, dtype=torch.bool).scatter_(-1, best[:, None], True)
    only_best &= (best_gain < 0)[:, None]
    use_all = joint <= best_gain
    return torch.where(use_all[:, None], changed.reshape(p, q), only_best).reshape(-1)
