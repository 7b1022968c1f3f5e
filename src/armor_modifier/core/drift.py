"""Fitting the dense model's outputs from the pruned model's inputs (drift correction).

In a sequential pass, a Linear of the partly pruned model sees inputs ``X_p [N, n]`` that have
drifted from the dense model's ``X_d`` (same tokens). The usual output objective fits
``W X_p^T`` (the unpruned layer on the drifted inputs); fitting the dense model's own output
``W X_d^T`` lets the layer undo part of the drift:

    (1/N) ||W_hat X_p^T - W X_d^T||^2 + tr((W_hat - W) D (W_hat - W)^T)
        = tr((W_hat - W*) (H + D) (W_hat - W*)^T) + const,

    H = X_p^T X_p / N,   C = X_p^T X_d / N,   W* = W (C^T + D) (H + D)^-1

with ``D`` the output objective's ridge (:func:`output_ridge`). So the ordinary output objective
with ``H`` and target ``W*`` minimises it exactly; ``W* = W`` when ``X_d = X_p``.
"""

from __future__ import annotations

import torch

__all__ = ["DAMPING_KINDS", "drift_corrected_target", "output_ridge"]

DAMPING_KINDS = ("identity", "diagonal")


def output_ridge(H: torch.Tensor, amount: float, kind: str) -> torch.Tensor:
    """The diagonal ``D`` ([n]) of the output objective's ridge on ``H`` ([n, n]).

    ``kind="identity"``: ``amount * mean(diag H)`` everywhere; ``"diagonal"``:
    ``amount * diag(H)``.
    """
    if kind not in DAMPING_KINDS:
        raise ValueError(f"output_damping_kind must be one of {DAMPING_KINDS}, got {kind!r}")
    diag = H.diagonal()
    if kind == "identity":
        return torch.full_like(diag, amount * float(diag.mean()))
    return amount * diag


def drift_corrected_target(
    weight: torch.Tensor,
    H: torch.Tensor,
    cross: torch.Tensor,
    ridge: torch.Tensor,
) -> torch.Tensor:
    """``W* = W (C^T + D)(H + D)^-1`` ([m, n] float32), see the module docstring.

    :param weight: ``[m, n]`` the unpruned weight ``W``
    :param H: ``[n, n]`` ``X_p^T X_p / N`` (pruned-model inputs)
    :param cross: ``[n, n]`` ``C = X_p^T X_d / N`` (pruned x dense inputs, same tokens)
    :param ridge: ``[n]`` the diagonal ``D``; ``H + D`` must be positive definite (a tiny extra
        ridge of ``1e-6 * mean(diag H)`` is added for dead channels)
    :raises ValueError: on mismatched shapes or non-finite input
    :raises torch.linalg.LinAlgError: if ``H + D`` cannot be factorised
    """
    W = weight.detach().to(torch.float32)
    m, n = W.shape
    for name, t in (("H", H), ("cross", cross)):
        if t.shape != (n, n):
            raise ValueError(
                f"{name} must be [{n}, {n}] for a [{m}, {n}] weight, got {tuple(t.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has non-finite entries; the calibration inputs overflowed")
    Hf, Cf = H.to(W), cross.to(W)
    D = ridge.to(W) + 1e-6 * float(Hf.diagonal().mean().clamp(min=1e-30))
    factor = torch.linalg.cholesky(Hf + torch.diag(D))
    # (H + D) W*^T = (C + D) W^T, H + D symmetric
    rhs = (Cf + torch.diag(D)) @ W.T
    return torch.cholesky_solve(rhs, factor).T.contiguous()
