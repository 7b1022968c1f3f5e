"""The paper's objective: NoWag's diagonal proxy loss and its block updates.

    L(A, B, W', M) = sum_ij h_j (A S B - Wbar)_ij^2 / sum_ij h_j Wbar_ij^2,   S = W' * M

(docs/algorithm.md, "Normalisation and the proxy objective" and "Block coordinate descent").
Glossary: ``Wbar [m, n]`` normalised weight, ``h [n]``,
``A [p, b, b]``, ``B [q, b, b]``, ``R = A S B - Wbar [m, n]`` the residual. Tile ``(I, K)`` of the
loss depends only on ``A_I``, ``S_IK`` and ``B_K``; every update below is batched over blocks or
tiles, and each one cannot raise the loss: block solves are accepted only where they lower it, the
core step is an exact line search, the discrete step keeps the old group when it is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockdiag import left_blockdiag, right_blockdiag
from .discrete import best_two_of_four
from .errors import ARMORValueError
from .iterate import Iterate, Start, reconstruct
from .linalg import damped_block_solve
from .problem import check_weight, normalize, sanitize_h
from .sparsegpt import (
    MAX_DAMPING_INCREASES,
    HessianNotPositiveDefinite,
    check_hessian,
    inverse_hessian_factor,
    sparsegpt_prune,
)
from .sparsity import top2_of_4_mask

__all__ = ["DiagonalProxy", "HessianStart", "hessian_start", "nowag_mask", "nowag_p", "proxy_start"]


class DiagonalProxy:
    """NoWag's proxy for one normalised weight.

    :param Wbar: ``[m, n]`` float32 normalised weight
    :param h: ``[n]`` float32, positive
    :param b: wrapper block size (``b | m``, ``b | n``, ``4 | b``)
    :param groups_per_tile: 4-groups resampled per tile in each discrete step (the paper: 1)
    """

    def __init__(
        self, Wbar: torch.Tensor, h: torch.Tensor, b: int, groups_per_tile: int = 1
    ) -> None:
        if groups_per_tile < 1:
            raise ARMORValueError(f"groups_per_tile must be >= 1, got {groups_per_tile!r}")
        self.Wbar, self.h, self.b = Wbar, h, b
        self.groups_per_tile = groups_per_tile
        self.m, self.n = Wbar.shape
        self.p, self.q = self.m // b, self.n // b
        self.denom = float((h * Wbar.square()).sum())

    # ----------------------------------------------------------------------------- evaluation
    def initial_iterate(self) -> Iterate:
        """NoWag-P: identity wrappers, ``W' = Wbar``, keep the top 2 of ``Wbar^2 h`` per group."""
        b, dev = self.b, self.Wbar.device
        eye = torch.eye(b, device=dev, dtype=self.Wbar.dtype)
        M = top2_of_4_mask(self.Wbar.square() * self.h)
        return Iterate(eye.repeat(self.p, 1, 1), eye.repeat(self.q, 1, 1), self.Wbar.clone(), M)

    def residual(self, it: Iterate) -> torch.Tensor:
        """``A S B - Wbar``, ``[m, n]``."""
        return reconstruct(it.A, it.S, it.B) - self.Wbar

    def loss_of_residual(self, R: torch.Tensor) -> float:
        if self.denom <= 0:
            return 0.0
        return float((self.h * R.square()).sum()) / self.denom

    def loss(self, it: Iterate) -> float:
        return self.loss_of_residual(self.residual(it))

    def exact_loss(self, it: Iterate) -> float:
        """:meth:`loss` (the proxy has no low-precision products)."""
        return self.loss(it)

    def gradient_S(self, R: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``A^T (R D) B^T`` (``dL/dS`` up to the factor ``2 / denom``), dense ``[m, n]``."""
        return right_blockdiag(left_blockdiag(A.transpose(1, 2), R * self.h), B.transpose(1, 2))

    # ----------------------------------------------------------------------- continuous steps
    def update_A(self, it: Iterate) -> int:
        """Exact ``A_I = Wbar_I D P_I^T (P_I D P_I^T)^-1``, ``P_I`` the rows of ``S B``.

        :return: number of blocks kept at their old value (failed or non-improving solves are not
            counted; only numerical failures are)
        """
        p, b, n = self.p, self.b, self.n
        P = right_blockdiag(it.S, it.B).reshape(p, b, n)
        Ph = P * self.h
        G = torch.bmm(Ph, P.transpose(1, 2))  # [p, b, b]
        C = torch.bmm(self.Wbar.reshape(p, b, n) * self.h, P.transpose(1, 2))  # [p, b, b]
        X, ok = damped_block_solve(G, C.transpose(1, 2))
        A_new = X.transpose(1, 2)

        def block_loss(A: torch.Tensor) -> torch.Tensor:  # up to a constant, [p]
            return (torch.bmm(A, G) * A).sum((1, 2)) - 2 * (A * C).sum((1, 2))

        better = ok & (block_loss(A_new) < block_loss(it.A))
        it.A = torch.where(better[:, None, None], A_new, it.A)
        return int((~ok).sum())

    def update_B(self, it: Iterate) -> int:
        """Exact ``B_K = (Q_K^T Q_K)^-1 Q_K^T Wbar_K``, ``Q_K`` the ``K``-th column slab of ``A S``.

        ``D`` drops out: it scales columns, and each column of ``B_K`` is its own least squares.
        """
        m, q, b = self.m, self.q, self.b
        Q = left_blockdiag(it.A, it.S).reshape(m, q, b).transpose(0, 1)  # [q, m, b]
        Wk = self.Wbar.reshape(m, q, b).transpose(0, 1)  # [q, m, b]
        G = torch.bmm(Q.transpose(1, 2), Q)  # [q, b, b]
        C = torch.bmm(Q.transpose(1, 2), Wk)  # [q, b, b]
        B_new, ok = damped_block_solve(G, C)
        hK = self.h.reshape(q, 1, b)

        def block_loss(B: torch.Tensor) -> torch.Tensor:  # h-weighted, up to a constant, [q]
            return ((torch.bmm(G, B) * B - 2 * C * B) * hK).sum((1, 2))

        better = ok & (block_loss(B_new) < block_loss(it.B))
        it.B = torch.where(better[:, None, None], B_new, it.B)
        return int((~ok).sum())

    def update_core(self, it: Iterate, steps: int) -> None:
        """``steps`` conjugate-gradient steps on the masked core with exact line search."""
        R = self.residual(it)
        grad = self.gradient_S(R, it.A, it.B) * it.M
        direction = -grad
        grad_sq = float(grad.square().sum())
        for _ in range(steps):
            if grad_sq == 0.0:
                return
            AdB = reconstruct(it.A, direction, it.B)
            curvature = float((self.h * AdB.square()).sum())
            if not curvature > 0.0:
                return
            alpha = -float((self.h * R * AdB).sum()) / curvature
            it.Wp = it.Wp + alpha * direction
            R = R + alpha * AdB
            grad = self.gradient_S(R, it.A, it.B) * it.M
            new_sq = float(grad.square().sum())
            direction = -grad + (new_sq / grad_sq) * direction
            grad_sq = new_sq

    # ----------------------------------------------------------------------------- discrete
    def discrete_step(self, it: Iterate, generator: torch.Generator) -> tuple[int, torch.Tensor]:
        """Resample ``groups_per_tile`` 4-groups per tile and give each its best 2:4 support.

        Section 5b: groups are sampled (without replacement) with probability proportional to
        the L1 norm of the dense gradient ``A^T (R D) B^T`` over the group. Tiles are independent,
        so each sub-step treats one group in every tile at once; the sub-steps of a tile run one
        after another on an exactly, incrementally updated residual tile (``O(b^2)`` per tile
        instead of a full ``O(m n b)`` product), so every sub-step is exact and non-increasing.

        :return: (fallback count, bool ``[m, n]`` of entries whose group changed)
        """
        p, q, b, m, n = self.p, self.q, self.b, self.m, self.n
        T, gpt = p * q, b // 4  # tiles, groups per tile row
        R = self.residual(it)
        score = self.gradient_S(R, it.A, it.B).abs().reshape(p, b, q, gpt, 4).sum(-1)
        score = score.permute(0, 2, 1, 3).reshape(T, b * gpt)
        empty = ~(score.sum(-1) > 0) | ~torch.isfinite(score).all(-1)
        score = torch.where(empty[:, None], torch.ones_like(score), score)
        score = score + torch.finfo(score.dtype).tiny  # sampling without replacement needs > 0
        k = min(self.groups_per_tile, b * gpt)
        picks = torch.multinomial(score, k, replacement=False, generator=generator)  # [T, k]

        tile = torch.arange(T, device=picks.device)
        I, K = tile // q, tile % q
        four = torch.arange(4, device=picks.device)
        h_tiles = self.h.reshape(q, b)[K]  # [T, b]
        R_tiles = R.reshape(p, b, q, b).permute(0, 2, 1, 3).reshape(T, b, b).contiguous()
        Wp, M = it.Wp.clone(), it.M.clone()
        touched = torch.zeros(m, n, dtype=torch.bool, device=M.device)
        fallbacks = 0
        for pick in picks.unbind(1):
            rho, grp = pick // gpt, pick % gpt
            rows = I * b + rho  # [T]
            cols = (K * b + 4 * grp)[:, None] + four  # [T, 4]
            old_mask = M[rows[:, None], cols]
            old_values = Wp[rows[:, None], cols] * old_mask
            a = it.A[I, :, rho]  # [T, b]
            aa = a.square().sum(-1)
            Braw = it.B[K[:, None], (4 * grp)[:, None] + four]  # [T, 4, b]
            # R_red = R - a (s_old^T Braw) is R with this group zeroed; only R_red^T a is needed.
            u = torch.bmm(R_tiles.transpose(1, 2), a[:, :, None]).squeeze(-1)  # [T, b]
            u = u - aa[:, None] * torch.bmm(old_values[:, None, :], Braw).squeeze(1)
            Bh = Braw * h_tiles[:, None, :]
            g = torch.bmm(Bh, u[:, :, None]).squeeze(-1)  # [T, 4]
            G4 = torch.bmm(Bh, Braw.transpose(1, 2))  # Braw D Braw^T
            upd = best_two_of_four(g, G4, aa, old_values, old_mask)
            step = torch.bmm((upd.values - old_values)[:, None, :], Braw)  # [T, 1, b]
            R_tiles.baddbmm_(a[:, :, None], step)
            Wp[rows[:, None], cols] = torch.where(upd.mask, upd.values, Wp[rows[:, None], cols])
            M[rows[:, None], cols] = upd.mask
            touched[rows[upd.changed][:, None], cols[upd.changed]] = True
            fallbacks += upd.fallbacks
        it.Wp, it.M = Wp, M
        return fallbacks, touched

    # --------------------------------------------------------------------------------- adam
    def gradients(self, it: Iterate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``dL/dA [p,b,b]``, ``dL/dB [q,b,b]``, ``dL/dW' [m,n]`` (masked) and the loss."""
        p, q, b, m, n = self.p, self.q, self.b, self.m, self.n
        S = it.S
        AS = left_blockdiag(it.A, S)
        SB = right_blockdiag(S, it.B)
        R = right_blockdiag(AS, it.B) - self.Wbar
        scale = 2.0 / self.denom if self.denom > 0 else 0.0
        Rh = R * self.h * scale
        gA = torch.bmm(Rh.reshape(p, b, n), SB.reshape(p, b, n).transpose(1, 2))
        ASk = AS.reshape(m, q, b).transpose(0, 1)
        gB = torch.bmm(ASk.transpose(1, 2), Rh.reshape(m, q, b).transpose(0, 1))
        gW = right_blockdiag(left_blockdiag(it.A.transpose(1, 2), Rh), it.B.transpose(1, 2))
        return gA, gB, gW * it.M, self.loss_of_residual(R)


def nowag_mask(W: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return top2_of_4_mask(normalize(W).Wbar.square() * h)


def nowag_p(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """NoWag-P 2:4 pruning: keep the 2 largest ``Wbar_ij^2 h_j`` of every 4-group.

    :param weight: ``[m, n]``
    :param h: ``[n]``
    :return: ``[m, n]`` float32, ``weight`` with the pruned entries zeroed
    """
    W = check_weight(weight)
    h, _ = sanitize_h(h, W.shape[1])
    return W * nowag_mask(W, h)


@dataclass(frozen=True)
class HessianStart:
    """A 2:4 start that needs the Hessian to factorise, or NoWag-P's where it never does.

    :ivar core: ``[m, n]`` core values in the weight's units (SparseGPT's, or ``W * mask``)
    :ivar mask: bool ``[m, n]`` 2:4 mask
    :ivar init: the start used: the one asked for, or ``"nowag"`` after the fallback
    :ivar damping: the ``lambda`` added to ``H`` that factorised (``0.0`` after the fallback)
    :ivar num_damping_increases: damping increases it took (``MAX_DAMPING_INCREASES`` after the
        fallback: every try failed)
    :ivar num_h_failures: ``1`` after the fallback, else ``0``
    """

    core: torch.Tensor
    mask: torch.Tensor
    init: str
    damping: float
    num_damping_increases: int
    num_h_failures: int = 0

    @property
    def fell_back(self) -> bool:
        """Whether ``H`` never factorised and this is NoWag-P's start."""
        return self.num_h_failures > 0


def hessian_start(
    W: torch.Tensor, h: torch.Tensor, H: torch.Tensor, init: str, dampening_frac: float
) -> HessianStart:
    """SparseGPT's 2:4 start (``init="sparsegpt"``) or NoWag-P's once ``H`` is known to factorise
    (``init="nowag"``), falling back to NoWag-P when ``H`` never factorises.

    ``H`` must factorise after damping (``dampening_frac * mean(diag H)``, times 10 at most
    ``MAX_DAMPING_INCREASES`` times, dead columns set to 1 as in SparseGPT). When every try
    fails, the start is NoWag-P's, counted as one ``H`` failure after ``MAX_DAMPING_INCREASES``
    increases: the one SparseGPT -> NoWag-P fallback of both objectives.

    :param W: ``[m, n]`` float32 weight
    :param h: ``[n]`` positive (NoWag-P's column weights)
    :param H: ``[n, n]`` symmetric (:func:`~.sparsegpt.check_hessian`'s)
    """
    try:
        if init == "sparsegpt":
            sgpt = sparsegpt_prune(W, H, dampening_frac=dampening_frac)
            return HessianStart(
                sgpt.weight, sgpt.mask, init, sgpt.damping, sgpt.num_damping_increases
            )
        Hd = H.clone()
        dead = Hd.diagonal() == 0
        Hd[dead, dead] = 1.0
        _, damping, increases = inverse_hessian_factor(Hd, dampening_frac)
    except HessianNotPositiveDefinite:
        mask = nowag_mask(W, h)
        return HessianStart(W * mask, mask, "nowag", 0.0, MAX_DAMPING_INCREASES, 1)
    mask = nowag_mask(W, h)
    return HessianStart(W * mask, mask, init, damping, increases)


def proxy_start(
    W: torch.Tensor,
    h: torch.Tensor,
    b: int,
    H: torch.Tensor | None,
    init: str,
    dampening_frac: float,
    groups_per_tile: int,
) -> Start:
    """The paper's proxy from NoWag-P, or from SparseGPT's solution (NoWag-P if ``H`` fails:
    :func:`hessian_start`)."""
    nw = normalize(W)
    objective = DiagonalProxy(nw.Wbar, h, b, groups_per_tile=groups_per_tile)

    def fold(it: Iterate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return it.A * nw.r.reshape(-1, b, 1), it.B * nw.c.reshape(-1, 1, b), it.S

    it = objective.initial_iterate()
    start = Start(objective, it, 0.0, fold, init)
    if init == "sparsegpt":
        first = hessian_start(W, h, check_hessian(H, W.shape[1]), init, dampening_frac)
        start.init = first.init
        start.num_damping_increases = first.num_damping_increases
        start.num_h_failures = first.num_h_failures
        if not first.fell_back:
            core = first.core / nw.r[:, None] / nw.c[None, :]
            start.iterate = Iterate(it.A, it.B, core, first.mask)
    start.loss = objective.loss(start.iterate)
    return start
