"""The two relative losses every method is scored on: the paper's proxy and the output error.

Shared by the solver, the benchmarks and the tests, so NoWag-P, Wanda, SparseGPT and ARMOR are
compared on one scale. Glossary: ``weight [m, n]``, ``h [n]``, ``H [n, n]``.
"""

from __future__ import annotations

import torch

from .errors import ARMORValueError
from .problem import check_weight, normalize, sanitize_h
from .sparsegpt import check_hessian

__all__ = ["DAMPING_KINDS", "damped", "output_loss", "output_ridge", "proxy_loss"]

#: How the output objective's ridge is shaped (:func:`output_ridge`).
DAMPING_KINDS = ("identity", "diagonal")


def proxy_loss(weight: torch.Tensor, h: torch.Tensor, approximation: torch.Tensor) -> float:
    """Relative NoWag proxy loss of any ``approximation [m, n]`` of ``weight [m, n]``.

    ``sum h_j (approx_bar - Wbar)^2 / sum h_j Wbar^2`` with both in ``weight``'s normalised
    units, so NoWag-P, Wanda, SparseGPT and ARMOR are comparable on one scale.
    """
    W = check_weight(weight)
    h, _ = sanitize_h(h, W.shape[1])
    if approximation.shape != W.shape:
        raise ARMORValueError(
            f"approximation has shape {tuple(approximation.shape)}, weight {tuple(W.shape)}"
        )
    nw = normalize(W)
    approx_bar = approximation.to(W) / nw.r[:, None] / nw.c[None, :]
    denom = float((h * nw.Wbar.square()).sum())
    return float((h * (approx_bar - nw.Wbar).square()).sum()) / denom if denom > 0 else 0.0


def output_loss(weight: torch.Tensor, H: torch.Tensor, approximation: torch.Tensor) -> float:
    """Relative output error ``tr(E H E^T) / tr(W H W^T)``, ``E = approximation - weight``.

    With ``H = X^T X / N`` this is ``||E X^T||^2 / ||W X^T||^2`` (computed in float64).

    :param weight: ``[m, n]``
    :param H: ``[n, n]``, finite (symmetrised)
    :param approximation: ``[m, n]``
    :return: ``0.0`` when ``tr(W H W^T) <= 0``
    """
    check_weight(weight)
    check_hessian(H, weight.shape[1])
    W = weight.detach().double()
    Hs = H.detach().double()
    Hs = (Hs + Hs.T) / 2
    if approximation.shape != W.shape:
        raise ARMORValueError(
            f"approximation has shape {tuple(approximation.shape)}, weight {tuple(W.shape)}"
        )
    E = approximation.detach().to(W) - W
    denom = float((W @ Hs * W).sum())
    return float((E @ Hs * E).sum()) / denom if denom > 0 else 0.0


def output_ridge(H: torch.Tensor, amount: float, kind: str) -> torch.Tensor:
    """The diagonal ``D`` ([n]) of the output objective's ridge on ``H`` ([n, n]).

    ``kind="identity"``: ``amount * mean(diag H)`` everywhere; ``"diagonal"``:
    ``amount * diag(H)``.
    """
    if kind not in DAMPING_KINDS:
        raise ARMORValueError(f"output_damping_kind must be one of {DAMPING_KINDS}, got {kind!r}")
    diag = H.diagonal()
    if kind == "identity":
        return torch.full_like(diag, amount * float(diag.mean()))
    return amount * diag


def damped(H: torch.Tensor, amount: float, kind: str, extra_ridge: float) -> torch.Tensor:
    """``H`` ([n, n]) + the ridge :func:`output_ridge` + ``extra_ridge * I``."""
    ridge = output_ridge(H, amount, kind) + extra_ridge
    if not bool(ridge.any()):
        return H
    out = H.clone()  # H + diag(ridge) without an n x n diagonal matrix
    out.diagonal().add_(ridge)
    return out
