"""The output objective's discrete step (docs/algorithm.md, "The output objective"): one
4-group per tile resampled and given its best 2:4 support, kept only where the loss does not
rise."""

from __future__ import annotations

from typing import Protocol

import torch

from .blockdiag import right_blockdiag_no_grad
from .discrete import best_two_of_four, joint_or_best
from .iterate import Iterate
from .output_state import KeptState, gram

__all__ = ["discrete_step"]


class OutputObjective(Protocol):
    """What the step reads of :class:`~armor_modifier.core.output.OutputObjective` (its sizes,
    ``H`` and its diagonal blocks, and its kept ``P``, ``P H`` and ``R = A^T E H``)."""

    p: int
    q: int
    b: int
    m: int
    n: int
    H: torch.Tensor
    H_blocks: torch.Tensor

    def _state_of(self, it: Iterate) -> KeptState: ...
    def _row_chunks(self) -> list[slice]: ...
    def _remember(self, it: Iterate, kept: KeptState) -> None: ...


def discrete_step(
    obj: OutputObjective, it: Iterate, generator: torch.Generator
) -> tuple[int, torch.Tensor]:
    """Resample one 4-group per tile and give it its best 2:4 support (section 11).

    For the group in row ``rho`` of tile ``(I, K)`` with ``a = A_I[:, rho]``, ``Bt`` its 4 rows
    of ``B_K`` and ``u = (a^T (E H)_I)_K`` (row ``rho`` of ``R_I = A_I^T (E H)_I`` on ``K``):
    ``g = Bt u - ||a||^2 G4 s_old`` and ``G4 = Bt H_KK Bt^T``; :func:`best_two_of_four` gives
    each group's exact optimum with the other groups fixed. Groups of one row block interact
    through ``A_I`` and ``H``, so per row block the exact loss change of applying all its groups
    is compared with that of its single best group, and the better one is applied: the loss
    never rises.

    :return: (fallback count, bool ``[m, n]`` of entries whose group changed)
    """
    p, q, b, m, n = obj.p, obj.q, obj.b, obj.m, obj.n
    T, gpt = p * q, b // 4
    kept = obj._state_of(it)
    B_transposed = it.B.transpose(1, 2).contiguous()
    score = torch.cat([  # |R B^T| (the core's gradient), a chunk of row slabs at a time
        right_blockdiag_no_grad(kept.R[rows], B_transposed).abs_().reshape(-1, b, q, gpt, 4).sum(-1)
        for rows in obj._row_chunks()
    ])
    score = score.permute(0, 2, 1, 3).reshape(T, b * gpt)
    empty = ~(score.sum(-1) > 0) | ~torch.isfinite(score).all(-1)
    score = torch.where(empty[:, None], torch.ones_like(score), score)
    # one group per tile with probability proportional to its score, by inverting the running
    # sum (torch.multinomial draws an exponential per entry: several times slower here)
    cumulative = score.cumsum(-1)
    draw = torch.rand(T, 1, generator=generator, dtype=score.dtype, device=score.device)
    pick = torch.searchsorted(cumulative, draw * cumulative[:, -1:], right=True)
    pick = pick.squeeze(-1).clamp_max(b * gpt - 1)  # [T]

    dev = pick.device
    tile = torch.arange(T, device=dev)
    I, K = tile // q, tile % q
    rho, grp = pick // gpt, pick % gpt
    rows = I * b + rho
    cols = (K * b + 4 * grp)[:, None] + torch.arange(4, device=dev)  # [T, 4]
    m_old = it.M[rows[:, None], cols]
    s_old = it.Wp[rows[:, None], cols] * m_old  # the core S = W' * M at the picked groups only
    a = it.A[I, :, rho]  # [T, b]
    Bt = it.B[K[:, None], (4 * grp)[:, None] + torch.arange(4, device=dev)]  # [T, 4, b]

    u = kept.R.reshape(p, b, q, b)[I, rho, K]  # [T, b]  (a^T (E H)_I)_K
    BtH = torch.einsum("pkcb,kbd->pkcd", Bt.reshape(p, q, 4, b), obj.H_blocks)
    G4 = torch.bmm(BtH.reshape(T, 4, b), Bt.transpose(1, 2))
    G4 = (G4 + G4.transpose(1, 2)) / 2
    aa = a.square().sum(-1)
    g = torch.bmm(Bt, u[:, :, None]).squeeze(-1)
    g = g - aa[:, None] * torch.bmm(G4, s_old[:, :, None]).squeeze(-1)
    upd = best_two_of_four(g, G4, aa, s_old, m_old)

    ds = upd.values - s_old
    single = 2 * (ds * g).sum(-1) + aa * (
        torch.einsum("tc,tcd,td->t", upd.values, G4, upd.values)
        - torch.einsum("tc,tcd,td->t", s_old, G4, s_old)
    )
    changed = upd.changed & (single < 0)
    delta = torch.bmm(ds[:, None, :], Bt).squeeze(1) * changed[:, None]  # [T, b] on cols K
    deltaH = torch.einsum("pkb,kbn->pkn", delta.reshape(p, q, b), obj.H.reshape(q, b, n))
    a3 = a.reshape(p, q, b)
    accept = joint_or_best(a3, delta.reshape(p, q, b), deltaH, u, changed, single)
    delta = (delta * accept[:, None]).reshape(p, q, b)
    deltaH = deltaH * accept.reshape(p, q, 1)
    # tile (I, K) changed row I*b + rho of P by delta on columns K, so R_I = A_I^T (A_I PH_I -
    # W_I H) by column rho of A_I^T A_I times delta H
    kept.P.view(p, b, q, b).index_put_((I, rho, K), delta.reshape(T, b), accumulate=True)
    kept.PH.index_add_(0, rows, deltaH.reshape(T, n))
    g3 = gram(it.A)[I, :, rho].reshape(p, q, b)
    kept.R.add_(torch.einsum("pkr,pkn->prn", g3, deltaH).reshape(m, n))

    it.Wp = it.Wp.clone()
    it.M = it.M.clone()
    values = torch.where(accept[:, None] & upd.mask, upd.values, it.Wp[rows[:, None], cols])
    it.Wp[rows[:, None], cols] = values
    it.M[rows[:, None], cols] = torch.where(accept[:, None], upd.mask, m_old)
    touched = torch.zeros(m, n, dtype=torch.bool, device=it.M.device)
    touched[rows[accept][:, None], cols[accept]] = True
    obj._remember(it, kept)
    return upd.fallbacks, touched
