"""ARMOR's block coordinate descent (ARMOR_SPEC.md sections 4-6): ``factorize``.

Glossary: ``W [m, n]`` weight, ``h [n]`` mean ``x^2`` per input channel, ``b`` wrapper block size,
``A [p, b, b]``, ``B [q, b, b]``, ``core [m, n]`` 2:4 sparse, ``W_hat = A core B``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .adam import AdamState
from .iterate import Iterate, reconstruct
from .problem import (
    check_weight,
    choose_wrapper_block_size,
    normalize,
    sanitize_h,
    wrapper_overhead,
)
from .proxy import DiagonalProxy
from .sparsity import top2_of_4_mask

__all__ = ["ARMORFactors", "factorize", "nowag_p", "proxy_loss", "MODES"]

MODES = ("exact", "adam")


@dataclass(frozen=True)
class ARMORFactors:
    """A factorised weight ``W_hat = blockdiag(A) @ core @ blockdiag(B)`` (original units, fp32).

    :ivar A: ``[p, b, b]`` output wrapper (row norms folded in)
    :ivar B: ``[q, b, b]`` input wrapper (column norms folded in)
    :ivar core: ``[m, n]`` 2:4 sparse core (zeros off ``mask``), normalised units
    :ivar mask: bool ``[m, n]``, exactly 2 of every 4 consecutive input columns per row
    :ivar loss_history: relative proxy loss; element 0 is the starting (NoWag-P) loss, element
        ``k`` the loss after iteration ``k``
    :ivar best_iteration: index into ``loss_history`` of the returned iterate
    :ivar wrapper_block_size: the block size used (may be smaller than requested)
    :ivar num_fallbacks: singular block or 2x2 systems that kept their old value
    :ivar num_sanitized_h: entries of ``h`` that were non-finite or non-positive
    """

    A: torch.Tensor
    B: torch.Tensor
    core: torch.Tensor
    mask: torch.Tensor
    loss_history: tuple[float, ...]
    best_iteration: int
    wrapper_block_size: int
    mode: str
    num_fallbacks: int
    num_sanitized_h: int
    seconds: float

    @property
    def initial_loss(self) -> float:
        return self.loss_history[0]

    @property
    def final_loss(self) -> float:
        """The loss of the returned (best) iterate; never above :attr:`initial_loss`."""
        return self.loss_history[self.best_iteration]

    @property
    def overhead(self) -> float:
        """Wrapper parameters relative to the dense weight, ``(m + n) b / (m n)``."""
        m, n = self.core.shape
        return wrapper_overhead(m, n, self.wrapper_block_size)

    def dense(self) -> torch.Tensor:
        """The reconstruction ``blockdiag(A) @ core @ blockdiag(B)``, ``[m, n]`` fp32."""
        return reconstruct(self.A, self.core, self.B)


def nowag_p(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """NoWag-P 2:4 pruning: keep the 2 largest ``Wbar_ij^2 h_j`` of every 4-group.

    :param weight: ``[m, n]``
    :param h: ``[n]``
    :return: ``[m, n]`` float32, ``weight`` with the pruned entries zeroed
    """
    W = check_weight(weight)
    h, _ = sanitize_h(h, W.shape[1])
    return W * top2_of_4_mask(normalize(W).Wbar.square() * h)


def proxy_loss(weight: torch.Tensor, h: torch.Tensor, approximation: torch.Tensor) -> float:
    """Relative NoWag proxy loss of any ``approximation [m, n]`` of ``weight [m, n]``.

    ``sum h_j (approx_bar - Wbar)^2 / sum h_j Wbar^2`` with both in ``weight``'s normalised
    units, so NoWag-P, Wanda, SparseGPT and ARMOR are comparable on one scale.
    """
    W = check_weight(weight)
    h, _ = sanitize_h(h, W.shape[1])
    if approximation.shape != W.shape:
        raise ValueError(
            f"approximation has shape {tuple(approximation.shape)}, weight {tuple(W.shape)}"
        )
    nw = normalize(W)
    approx_bar = approximation.to(W) / nw.r[:, None] / nw.c[None, :]
    denom = float((h * nw.Wbar.square()).sum())
    return float((h * (approx_bar - nw.Wbar).square()).sum()) / denom if denom > 0 else 0.0


def factorize(
    weight: torch.Tensor,
    h: torch.Tensor,
    *,
    wrapper_block_size: int = 128,
    num_iterations: int = 200,
    mode: Literal["exact", "adam"] = "exact",
    lr: float = 1e-4,
    cg_steps: int = 2,
    update_mask: bool = True,
    patience: int = 100,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> ARMORFactors:
    """Factorise ``weight`` as ``A · (W' ⊙ M) · B`` with ARMOR's block coordinate descent.

    Starts at NoWag-P (identity wrappers), alternates a continuous step on ``(A, B, W')`` and a
    discrete 2:4 step, and returns the best iterate seen, so ``final_loss <= initial_loss``.

    :param weight: ``[m, n]`` any float dtype (computed in fp32; never modified)
    :param h: ``[n]`` mean of ``x_j^2`` over calibration tokens; non-finite or non-positive
        entries are replaced by the mean of the valid ones (counted in ``num_sanitized_h``)
    :param wrapper_block_size: requested ``b``; the largest multiple of 4 not above it that divides
        ``m`` and ``n`` is used
    :param num_iterations: maximum BCD iterations (paper: 20,000)
    :param mode: ``"exact"`` closed-form ``A``/``B`` and conjugate gradient on the core (monotone);
        ``"adam"`` the paper's joint Adam step
    :param lr: Adam learning rate (``mode="adam"``)
    :param cg_steps: conjugate-gradient steps on the core per iteration (``mode="exact"``)
    :param update_mask: run the discrete 2:4 step (``False`` keeps NoWag-P's mask)
    :param patience: stop after this many iterations without improvement of ``rtol``/``atol``
    :param seed: seeds the group sampling (deterministic on CPU for a seed)
    :param callback: called as ``callback(iteration, loss)`` after every iteration
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(num_iterations, int) or num_iterations < 0:
        raise ValueError(f"num_iterations must be a non-negative int, got {num_iterations!r}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience!r}")
    start = time.perf_counter()
    W = check_weight(weight)
    m, n = W.shape
    h, num_sanitized = sanitize_h(h, n)
    h = h.to(W.device)
    b = choose_wrapper_block_size(m, n, wrapper_block_size)
    nw = normalize(W)
    objective = DiagonalProxy(nw.Wbar, h, b)

    it = objective.initial_iterate()
    history = [objective.loss(it)]
    best, best_index, fallbacks = it.clone(), 0, 0
    generator = torch.Generator(device=W.device).manual_seed(seed)
    adam = AdamState(lr=lr)
    stale = 0
    for k in range(1, num_iterations + 1):
        if history[best_index] == 0.0:
            break
        if mode == "exact":
            fallbacks += objective.update_A(it) + objective.update_B(it)
            objective.update_core(it, cg_steps)
        else:
            *grads, _ = objective.gradients(it)
            adam.step(it, tuple(grads))
        if update_mask:
            failed, touched = objective.discrete_step(it, generator)
            fallbacks += failed
            adam.reset_core_moments(touched)
        loss = objective.loss(it)
        history.append(loss)
        if callback is not None:
            callback(k, loss)
        if loss < history[best_index] - max(rtol * history[best_index], atol):
            stale = 0
        else:
            stale += 1
        if loss < history[best_index]:
            best, best_index = it.clone(), k
        if stale >= patience:
            break

    A = best.A * nw.r.reshape(-1, b, 1)
    B = best.B * nw.c.reshape(-1, 1, b)
    return ARMORFactors(
        A=A,
        B=B,
        core=best.S,
        mask=best.M.clone(),
        loss_history=tuple(history),
        best_iteration=best_index,
        wrapper_block_size=b,
        mode=mode,
        num_fallbacks=fallbacks,
        num_sanitized_h=num_sanitized,
        seconds=time.perf_counter() - start,
    )
