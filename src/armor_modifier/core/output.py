"""The output-aware objective (docs/algorithm.md, "The output objective") and its block updates.

    L_H(A, B, S) = tr((A S B - W) H (A S B - W)^T) / tr(W H W^T),    H = X^T X / N

With that ``H``, ``L_H = ||(W_hat - W) X^T||^2 / ||W X^T||^2``: the relative output error of the
layer on the calibration inputs (SparseGPT's objective).

Glossary: ``W [m, n]``, ``H [n, n]`` symmetric positive semi-definite, ``A [p, b, b]``,
``B [q, b, b]``, ``S [m, n]`` 2:4 core, ``E = A S B - W`` the residual, ``EH = E H``. Rows of
``E`` never interact (``tr(E H E^T) = sum_i e_i H e_i^T``), so ``A``'s blocks separate exactly;
columns interact through the off-diagonal blocks of ``H``, so ``B``'s blocks and the groups of one
row block do not.

Units. The problem is solved in the columns' *H-diagonal units*: with ``d_j = sqrt(H_jj)``
(``1`` for a dead column, ``H_jj = 0``), ``W~ = W diag(d)``, ``H~ = diag(d)^-1 H diag(d)^-1`` (unit
diagonal) and ``E~ = E diag(d)``, ``tr(E H E^T) = tr(E~ H~ E~^T)`` exactly: the loss is the same
number, not a proxy of it. An iterate ``A S~ B~`` of ``W~`` is ``W_hat = A S~ (B~ diag(d)^-1)``
in original units (still block-diagonal, mask unchanged); the start is ``S~ = S diag(d)``,
``B~ = I``. This is the Jacobi scaling of the core's quadratic (its curvature at ``A = B = I`` is
``H~`` per row), which gradient and conjugate-gradient steps need when the channel energies
``H_jj`` span orders of magnitude. Rows are *not* normalised, and ``W``'s NoWag norms are not used:
the loss weights every output row equally, and a row scaling would turn it into a weighted sum
that CG would then minimise less well (the closed-form ``A`` and the discrete step are
scale-invariant). On return (:meth:`OutputObjective.to_original`) the core is NoWag-normalised
and its scales are moved into the wrappers.

Every update is exact or an exact line search on a quadratic, and is kept only where it does not
raise the loss, so the loss is non-increasing.

State in ``P``'s space. Between updates the objective keeps ``P = S B``, ``PH = P H`` and
``R = A^T (E H)`` (``E = A P - W``, so ``E H = A PH - W H``); every quantity a step needs comes
from them: the core's gradient is ``R B^T``, ``B``'s gradient block ``S_K^T R_K``, and along a
direction with ``D' = Delta_S B`` or ``S Delta_B`` (``D = A D'``) the line search's terms are
``<E H, D> = <R, D'>`` and ``<D H, D> = <D', (A^T A) D'H>``. A step therefore forms ``D'``,
``D'H`` and ``(A^T A) D'H``, and corrects ``P``, ``PH`` and ``R`` by them: two block products per
direction instead of three, and the gradients one instead of two (docs/results.md, layer
scaling). :meth:`update_A` reads ``P`` and ``PH`` and forms ``R`` for the new ``A``; the loss is
``<P, R> - <W, E H>``. ``P`` and ``P H`` are formed afresh when the cache does not match the
iterate (the first iteration, after Adam steps), and in bfloat16 mode (``matmul_precision``)
every :data:`BF16_REFRESH_ITERATIONS` iterations, in float32: the steps' bfloat16 products make
kept ones drift slowly.
"""

from __future__ import annotations

import torch

from .blockdiag import left_blockdiag, right_blockdiag_no_grad
from .iterate import Iterate
from .linalg import damped_block_solve
from .output_discrete import discrete_step
from .output_state import KeptState, dot, dot_by_rows, gram, row_dots
from .problem import normalize

__all__ = ["BF16_REFRESH_ITERATIONS", "OUTPUT_B_STEPS", "OutputObjective"]

#: Preconditioned CG steps on ``B`` per iteration of the output objective.
OUTPUT_B_STEPS = 1

#: In bfloat16 mode, iterations between float32 refreshes of the kept ``P H`` (and so of ``R``);
#: the drift this bounds and the cost of one refresh: docs/results.md, layer scaling.
BF16_REFRESH_ITERATIONS = 8

#: Entries per row chunk of ``update_A``, the core's CG steps and the discrete step's scores
#: (whole row slabs; a chunk's tensors stay in the CPU's caches across the passes of one update:
#: docs/results.md, layer scaling).
CHUNK_ELEMENTS = 1 << 21


def _block_loss(A: torch.Tensor, G: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``tr(E_I H E_I^T)`` minus a constant per row slab, ``[p]``, for ``A [p, b, b]``,
    ``G = P_I H P_I^T`` and ``C = W_I H P_I^T`` (both ``[p, b, b]``)."""
    return (torch.bmm(A, G) * A).sum((1, 2)) - 2 * (A * C).sum((1, 2))


class OutputObjective:
    """The relative output error of one weight, in H-diagonal units (see the module docstring).

    Same interface as :class:`~armor_modifier.core.proxy.DiagonalProxy`, so ``factorize``'s block
    coordinate descent drives either.

    :param W: ``[m, n]`` weight in original units (float32 in the solver; float64 works too)
    :param H: ``[n, n]`` symmetric positive semi-definite, same dtype
    :param b: wrapper block size (``b | m``, ``b | n``, ``4 | b``)
    :param b_steps: preconditioned conjugate-gradient steps per :meth:`update_B`
    :param matmul_precision: ``"float32"``, or ``"bfloat16"``: the ``D H`` products of the
        conjugate-gradient steps on ``B`` and on the core take bfloat16 inputs (the loss and the
        line searches sum each row in float32 in both modes). In bfloat16 mode :meth:`update_A`
        forms ``P`` and ``P H`` afresh in float32 (``P H`` in bfloat16 would cost the descent ~2 %
        of its loss) every :data:`BF16_REFRESH_ITERATIONS` iterations, so :meth:`loss` is off only
        by the drift of that many iterations' steps, and
        :meth:`exact_loss` gives the float32 value the solver returns
    """

    def __init__(
        self,
        W: torch.Tensor,
        H: torch.Tensor,
        b: int,
        *,
        b_steps: int = 1,
        matmul_precision: str = "float32",
    ) -> None:
        self.b, self.b_steps = b, b_steps
        self.m, self.n = W.shape
        self.p, self.q = self.m // b, self.n // b
        diag = H.diagonal()
        self.d = torch.where(diag > 0, diag.clamp_min(0).sqrt(), torch.ones_like(diag))
        self.W = W * self.d
        self.H = H / self.d[:, None] / self.d[None, :]
        self.WH = self.W @ self.H
        self.H_low = self.H.bfloat16() if matmul_precision == "bfloat16" else None
        self.denom = dot(self.W, self.WH)
        q = self.q
        self.H_blocks = (
            self.H.reshape(q, b, q, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
        )  # [q, b, b] H_KK
        self._kept: KeptState | None = None
        self._PH_reuses = 0  # update_A calls since P H was last formed in float32
        self._mask: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------- evaluation
    def initial_iterate(self, core: torch.Tensor, mask: torch.Tensor) -> Iterate:
        """Identity wrappers around a given 2:4 core (e.g. SparseGPT's or NoWag-P's).

        :param core: ``[m, n]`` core values in original units
        :param mask: bool ``[m, n]`` 2:4 mask
        """
        eye = torch.eye(self.b, dtype=self.W.dtype, device=self.W.device)
        Wp = core.to(self.W) * mask * self.d
        return Iterate(eye.repeat(self.p, 1, 1), eye.repeat(self.q, 1, 1), Wp, mask.clone())

    def to_original(self, it: Iterate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A [p,b,b], B [q,b,b], core [m,n])`` with ``A core B`` in original units.

        ``A S~ B~ diag(d)^-1 = (A diag(r)) Sbar (diag(c) B~ diag(d)^-1)`` with the core NoWag-
        normalised (``S~ = diag(r) Sbar diag(c)``, columns first): the returned core has rows and
        columns of unit norm, as the proxy's does, whatever the channel energies.
        """
        p, q, b = self.p, self.q, self.b
        nw = normalize(it.S)
        A = it.A * nw.r.reshape(p, 1, b)
        B = it.B * nw.c.reshape(q, b, 1) / self.d.reshape(q, 1, b)
        return A, B, nw.Wbar * it.M

    def _float_mask(self, M: torch.Tensor) -> torch.Tensor:
        """``M`` as 0/1 in ``W``'s dtype, kept while ``it.M`` is the same tensor (a product with
        a float mask is about 3.5x faster on CPU than with the bool one)."""
        if self._mask is None or self._mask[0] is not M:
            self._mask = (M, M.to(self.W.dtype))
        return self._mask[1]

    def _core(self, it: Iterate) -> torch.Tensor:
        """``S = W' * M``, ``[m, n]`` (:attr:`Iterate.S` through the kept float mask)."""
        return it.Wp * self._float_mask(it.M)

    def _fresh(self, it: Iterate) -> KeptState:
        """``P``, ``P H`` (float32) and ``R`` of ``it`` formed afresh, and kept."""
        P = right_blockdiag_no_grad(self._core(it), it.B)
        PH = P @ self.H
        kept = KeptState((it.A, it.B, it.Wp, it.M), P, PH, self._R(it.A, PH))
        self._kept = kept
        return kept

    def _R(self, A: torch.Tensor, PH: torch.Tensor) -> torch.Tensor:
        """``R = A^T (A PH - W H)``, ``[m, n]``."""
        return left_blockdiag(A.transpose(1, 2), left_blockdiag(A, PH).sub_(self.WH))

    def _kept_of(self, it: Iterate) -> KeptState | None:
        """The kept state when it is ``it``'s, else ``None``."""
        kept = self._kept
        return kept if kept is not None and kept.matches(it) else None

    def _state_of(self, it: Iterate) -> KeptState:
        """The kept state of ``it`` (formed afresh when the kept one is another iterate's)."""
        return self._kept_of(it) or self._fresh(it)

    def _remember(self, it: Iterate, kept: KeptState) -> None:
        kept.key = (it.A, it.B, it.Wp, it.M)
        self._kept = kept

    def _state(self, it: Iterate) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, E H)`` of ``it`` from the kept ``P`` and ``P H`` (two block products)."""
        kept = self._state_of(it)
        return left_blockdiag(it.A, kept.P) - self.W, left_blockdiag(it.A, kept.PH) - self.WH

    def _cached_PH(self, it: Iterate) -> torch.Tensor | None:
        """The kept ``PH`` when it is ``it``'s, else ``None``."""
        kept = self._kept_of(it)
        return None if kept is None else kept.PH

    def _reusable(self, it: Iterate) -> KeptState | None:
        """The kept state for :meth:`update_A`, except in bfloat16 mode after
        :data:`BF16_REFRESH_ITERATIONS` reuses: the steps' bfloat16 ``D H`` products make a kept
        ``P H`` drift (0.9 % of ``E H`` after 40 iterations at 128 x 128 if never formed
        afresh; 0.08 % with a refresh every 8), so it is formed afresh in float32 then."""
        kept = self._kept_of(it)
        if self.H_low is not None and self._PH_reuses >= BF16_REFRESH_ITERATIONS - 1:
            kept = None
        self._PH_reuses = 0 if kept is None else self._PH_reuses + 1
        return kept

    def loss_of_residual(self, E: torch.Tensor, EH: torch.Tensor) -> float:
        return dot_by_rows(E, EH) / self.denom if self.denom > 0 else 0.0

    def loss(self, it: Iterate) -> float:
        """``<E, E H> / denom = (<P, R> - <W, E H>) / denom`` (one block product)."""
        if not self.denom > 0:
            return 0.0
        kept = self._state_of(it)
        EH = left_blockdiag(it.A, kept.PH) - self.WH
        return (dot_by_rows(kept.P, kept.R) - dot_by_rows(self.W, EH)) / self.denom

    def exact_loss(self, it: Iterate) -> float:
        """:meth:`loss` with the kept state formed afresh in float32 (``matmul_precision``)."""
        if self.H_low is not None:
            self._fresh(it)
        return self.loss(it)

    def _times_H(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ H`` for ``X [r, n]``: float32, or bfloat16 inputs (``matmul_precision``)."""
        if self.H_low is None:
            return X @ self.H
        return (X.bfloat16() @ self.H_low).to(X.dtype)

    def gradient_S(self, EH: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``A^T (E H) B^T`` (``dL/dS`` up to the factor ``2 / denom``), dense ``[m, n]``."""
        return right_blockdiag_no_grad(left_blockdiag(A.transpose(1, 2), EH), B.transpose(1, 2))

    # ----------------------------------------------------------------------- continuous steps
    def update_A(self, it: Iterate) -> int:
        """Exact ``A_I = (W_I H P_I^T)(P_I H P_I^T)^-1``, ``P_I`` the ``I``-th row slab of ``S B``.

        Row slabs of ``E`` are independent, so this is the exact minimiser over every block at
        once. Blocks whose solve fails or does not lower their loss keep their old value.

        :return: number of singular block systems
        """
        b, n = self.b, self.n
        kept = self._reusable(it)
        P = torch.empty_like(self.W) if kept is None else kept.P
        PH = torch.empty_like(self.W) if kept is None else kept.PH
        R, A = torch.empty_like(self.W), torch.empty_like(it.A)
        mask = self._float_mask(it.M)
        failed = 0
        for rows in self._row_chunks():  # a chunk of row slabs at a time, as update_core
            slabs = slice(rows.start // b, rows.stop // b)
            if kept is None:
                P[rows] = right_blockdiag_no_grad(it.Wp[rows] * mask[rows], it.B)
                torch.mm(P[rows], self.H, out=PH[rows])
            Pb = P[rows].reshape(-1, b, n)
            G = torch.bmm(PH[rows].reshape(-1, b, n), Pb.transpose(1, 2))
            G = (G + G.transpose(1, 2)) / 2  # [p, b, b]  P_I H P_I^T
            C = torch.bmm(self.WH[rows].reshape(-1, b, n), Pb.transpose(1, 2))  # W_I H P_I^T
            X, ok = damped_block_solve(G, C.transpose(1, 2))
            A_new, A_old = X.transpose(1, 2), it.A[slabs]
            better = ok & (_block_loss(A_new, G, C) < _block_loss(A_old, G, C))
            A[slabs] = torch.where(better[:, None, None], A_new, A_old)
            EH = left_blockdiag(A[slabs], PH[rows]).sub_(self.WH[rows])
            torch.bmm(A[slabs].transpose(1, 2), EH.reshape(-1, b, n), out=R[rows].view(-1, b, n))
            failed += int((~ok).sum())
        it.A = A
        self._remember(it, KeptState((), P, PH, R))
        return failed

    def update_B(self, it: Iterate) -> int:
        """Block-Jacobi preconditioned conjugate gradient on ``B`` with exact steps.

        With ``Q = A S`` and ``Q_K`` its ``K``-th column slab, the gradient block is
        ``Q_K^T (E H)_K = S_K^T R_K`` and the preconditioner
        ``Delta_K = (Q_K^T Q_K)^-1 Q_K^T (E H)_K H_KK^-1`` (the exact block solve if ``H`` were
        block-diagonal), ``Q_K^T Q_K = S_K^T (A^T A S)_K``. Along a direction ``Delta`` the loss
        is quadratic with ``D' = S Delta``: ``alpha = -<R, D'> / <D', (A^T A) D' H>``.

        :return: number of singular ``Q_K^T Q_K`` or ``H_KK`` blocks (those blocks do not move)
        """
        m, q, b = self.m, self.q, self.b
        kept = self._state_of(it)
        S, GA = self._core(it), gram(it.A)
        Sk = S.reshape(m, q, b).transpose(0, 1)  # [q, m, b]
        QQ = torch.bmm(Sk.transpose(1, 2), left_blockdiag(GA, S).reshape(m, q, b).transpose(0, 1))
        QQ = (QQ + QQ.transpose(1, 2)) / 2

        def gradient() -> torch.Tensor:  # [q, b, b]
            return torch.bmm(Sk.transpose(1, 2), kept.R.reshape(m, q, b).transpose(0, 1))

        def precondition(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            left, ok_q = damped_block_solve(QQ, r)
            right, ok_h = damped_block_solve(self.H_blocks, left.transpose(1, 2))
            return right.transpose(1, 2), ok_q & ok_h

        r = gradient()
        z, ok = precondition(r)
        direction, rz = -z, dot_by_rows(r, z)
        B = it.B
        for step in range(self.b_steps):
            D_P = right_blockdiag_no_grad(S, direction)  # P's change per unit step
            D_PH = self._times_H(D_P)
            D_R = left_blockdiag(GA, D_PH)  # R's change per unit step
            curvature = dot_by_rows(D_P, D_R)
            if not curvature > 0.0:
                break
            alpha = -dot_by_rows(kept.R, D_P) / curvature
            B = B + alpha * direction
            kept.P.add_(D_P, alpha=alpha)
            kept.PH.add_(D_PH, alpha=alpha)
            kept.R.add_(D_R, alpha=alpha)
            if step + 1 == self.b_steps:
                break
            r_new = gradient()
            z_new, _ = precondition(r_new)
            beta = max(0.0, dot_by_rows(r_new, z_new - z) / rz) if rz > 0 else 0.0
            direction, z, rz = -z_new + beta * direction, z_new, dot_by_rows(r_new, z_new)
        it.B = B
        self._remember(it, kept)
        return int((~ok).sum())

    def _block_dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``<x_I, y_I>`` per row slab, float64 ``[rows / b]`` (each row summed in the tensors'
        dtype, as :func:`~.output_state.dot_by_rows`)."""
        return row_dots(x, y).reshape(-1, self.b).sum(-1, dtype=torch.float64)

    def _core_jacobi(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse diagonal of the core's curvature, ``1 / (diag(A^T A)_i diag(B H B^T)_j)``, as
        its two factors (zero where a factor is zero).

        :return: (``[m]``, ``[n]``)
        """
        a = A.square().sum(1).reshape(-1)  # [m]
        BH = torch.bmm(B, self.H_blocks)
        c = (BH * B).sum(-1).reshape(-1)  # [n]  diag(B_K H_KK B_K^T)
        inv_a = torch.where(a > 0, 1 / a, torch.zeros_like(a))
        return inv_a, torch.where(c > 0, 1 / c, torch.zeros_like(c))

    def _row_chunks(self) -> list[slice]:
        """Row ranges of whole row slabs, about :data:`CHUNK_ELEMENTS` entries each."""
        rows = max(1, CHUNK_ELEMENTS // (self.n * self.b)) * self.b
        return [slice(start, min(start + rows, self.m)) for start in range(0, self.m, rows)]

    def update_core(self, it: Iterate, steps: int) -> None:
        """``steps`` Jacobi-preconditioned CG (Polak-Ribiere+) steps on the masked core.

        The core of row slab ``I`` only moves ``E_I`` and the loss is a sum over row slabs, so
        every slab runs its own CG (own ``alpha_I``, ``beta_I``), batched, a chunk of row slabs
        at a time (:meth:`_core_steps`: the chunk's tensors stay in the CPU's caches across the
        steps). The gradient is ``R B^T``; along a masked direction ``Delta`` with
        ``D' = Delta B``: ``alpha_I = -<R_I, D'_I> / <D'_I, (A_I^T A_I) (D' H)_I>`` (exact).
        """
        kept = self._state_of(it)
        inv_a, inv_c = self._core_jacobi(it.A, it.B)
        mask = self._float_mask(it.M)
        GA, Bt = gram(it.A), it.B.transpose(1, 2).contiguous()
        Wp = it.Wp.clone()
        b = self.b
        for rows in self._row_chunks():
            slabs = slice(rows.start // b, rows.stop // b)
            jacobi = torch.outer(inv_a[rows], inv_c).mul_(mask[rows])
            views = (Wp[rows], kept.P[rows], kept.PH[rows], kept.R[rows])
            self._core_steps(GA[slabs], it.B, Bt, jacobi, *views, steps)
        it.Wp = Wp
        self._remember(it, kept)

    def _core_steps(
        self,
        GA: torch.Tensor,
        B: torch.Tensor,
        Bt: torch.Tensor,
        jacobi: torch.Tensor,
        Wp: torch.Tensor,
        P: torch.Tensor,
        PH: torch.Tensor,
        R: torch.Tensor,
        steps: int,
    ) -> None:
        """:meth:`update_core` on one chunk of row slabs; ``Wp``, ``P``, ``PH`` and ``R`` (views
        ``[r, n]`` of the whole tensors) are updated in place.

        :param GA: the chunk's ``[r / b, b, b]`` blocks of ``A^T A``
        :param Bt: ``B`` with each block transposed, ``[q, b, b]``
        :param jacobi: ``[r, n]`` the preconditioner on the mask (zero off it), so ``z`` and every
            direction are masked and the gradient needs no mask of its own
        """
        b = self.b
        grad = right_blockdiag_no_grad(R, Bt)
        z = grad * jacobi
        direction, rz = -z, self._block_dot(grad, z)
        for step in range(steps):
            D_P = right_blockdiag_no_grad(direction, B)  # P's change per unit step
            D_PH = self._times_H(D_P)
            D_R = left_blockdiag(GA, D_PH)  # R's change per unit step
            curvature = self._block_dot(D_P, D_R)
            usable = (curvature > 0) & (rz > 0)
            if not bool(usable.any()):
                break
            alpha = -self._block_dot(R, D_P) / torch.where(usable, curvature, 1.0)
            per_row = torch.where(usable, alpha, 0.0).to(Wp.dtype).repeat_interleave(b)[:, None]
            Wp.addcmul_(per_row, direction)
            P.addcmul_(per_row, D_P)
            PH.addcmul_(per_row, D_PH)
            R.addcmul_(per_row, D_R)
            if step + 1 == steps:
                break
            new = right_blockdiag_no_grad(R, Bt)
            z_new = new * jacobi
            rz_new = self._block_dot(new, z_new)  # Polak-Ribiere: <new, z_new - z> / rz
            beta = (rz_new - self._block_dot(new, z)) / torch.where(rz > 0, rz, 1.0)
            beta = beta.clamp_min(0).to(Wp.dtype).repeat_interleave(b)[:, None]
            direction = direction.mul_(beta).sub_(z_new)
            z, rz = z_new, rz_new

    # ----------------------------------------------------------------------------- discrete
    def discrete_step(self, it: Iterate, generator: torch.Generator) -> tuple[int, torch.Tensor]:
        """One 4-group per tile resampled and given its best 2:4 support
        (:func:`~armor_modifier.core.output_discrete.discrete_step`).

        :return: (fallback count, bool ``[m, n]`` of entries whose group changed)
        """
        return discrete_step(self, it, generator)

    # --------------------------------------------------------------------------------- adam
    def gradients(self, it: Iterate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``dL/dA [p,b,b]``, ``dL/dB [q,b,b]``, ``dL/dW' [m,n]`` (masked) and the loss."""
        p, q, b, m, n = self.p, self.q, self.b, self.m, self.n
        E, EH = self._state(it)
        scale = 2.0 / self.denom if self.denom > 0 else 0.0
        S, P = self._core(it), self._state_of(it).P
        Q = left_blockdiag(it.A, S)
        gA = torch.bmm(EH.reshape(p, b, n), P.reshape(p, b, n).transpose(1, 2)) * scale
        Qk = Q.reshape(m, q, b).transpose(0, 1)
        gB = torch.bmm(Qk.transpose(1, 2), EH.reshape(m, q, b).transpose(0, 1)) * scale
        gW = self.gradient_S(EH, it.A, it.B) * self._float_mask(it.M) * scale
        return gA, gB, gW, self.loss_of_residual(E, EH)

