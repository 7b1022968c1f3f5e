"""Batched, damped, checked solves of small symmetric positive (semi-)definite systems, and the
inverse of a large lower-triangular matrix."""

from __future__ import annotations

import torch

__all__ = ["damped_block_solve", "lower_triangular_inverse"]

RELATIVE_RIDGE = 1e-6
#: order up to which :func:`lower_triangular_inverse` solves against the identity directly
TRIANGULAR_LEAF = 256


def damped_block_solve(G: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``(G_k + lambda_k I) X_k = C_k`` for every block ``k`` by Cholesky.

    ``lambda_k = 1e-6 * mean(diag(G_k))`` (a relative ridge). Blocks whose factorisation fails
    (``cholesky_ex`` info != 0, e.g. an all-zero ``G_k``) or whose solution is not finite are
    reported in ``ok``; their ``X_k`` is zero and must not be used.

    :param G: ``[k, b, b]`` symmetric
    :param C: ``[k, b, c]``
    :return: (``X [k, b, c]``, bool ``ok [k]``)
    """
    b = G.shape[-1]
    ridge = RELATIVE_RIDGE * G.diagonal(dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(b, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G + ridge[:, None, None] * eye)
    ok = (info == 0) & (ridge > 0)
    L = torch.where(ok[:, None, None], L, eye)
    X = torch.cholesky_solve(C, L)
    ok = ok & torch.isfinite(X).flatten(1).all(-1)
    return torch.where(ok[:, None, None], X, torch.zeros_like(X)), ok


def lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor:
    """``L^-1`` of a lower-triangular ``L [n, n]`` (lower triangular too; the upper triangle of
    ``L`` is not read).

    Split in halves: ``[[L11, 0], [L21, L22]]^-1 = [[X11, 0], [-X22 L21 X11, X22]]`` with
    ``Xii = Lii^-1`` found the same way, down to blocks of :data:`TRIANGULAR_LEAF` solved against
    the identity. About ``n^3 / 3`` multiply-adds, in matrix products, where one triangular solve
    against the whole identity costs ``n^3`` (docs/results.md, layer scaling).
    """
    out = torch.zeros_like(L)
    _invert_into(L, out)
    return out


def _invert_into(L: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``L^-1`` into the zeroed ``out`` (same shape as ``L``, lower triangular)."""
    n = L.shape[0]
    if n <= TRIANGULAR_LEAF:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        out.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return
    k = (n // 2 + 63) // 64 * 64  # a multiple of 64 near the middle
    _invert_into(L[:k, :k], out[:k, :k])
    _invert_into(L[k:, k:], out[k:, k:])
    torch.matmul(out[k:, k:], L[k:, :k] @ out[:k, :k], out=out[k:, :k])
    out[k:, :k].neg_()
