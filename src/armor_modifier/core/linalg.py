"""Batched, damped, checked solves of small symmetric positive (semi-)definite systems."""

from __future__ import annotations

import torch

__all__ = ["damped_block_solve"]

RELATIVE_RIDGE = 1e-6


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
