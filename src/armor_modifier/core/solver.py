"""ARMOR's block coordinate descent (docs/algorithm.md): ``factorize``.

Glossary: ``W [m, n]`` weight, ``h [n]`` mean ``x^2`` per input channel, ``H [n, n]`` the layer
Hessian ``X^T X / N``, ``b`` wrapper block size, ``A [p, b, b]``, ``B [q, b, b]``, ``core [m, n]``
2:4 sparse, ``W_hat = A core B``.

Two objectives share one loop: the paper's diagonal proxy (:class:`DiagonalProxy`, from NoWag-P)
and the layer's relative output error (:class:`OutputObjective`, from SparseGPT).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .adam import AdamState
from .errors import ARMORValueError
from .iterate import Iterate, Objective, reconstruct
from .output_start import output_start
from .precision import resolve_matmul_precision
from .problem import check_weight, sanitize_h, wrapper_overhead
from .proxy import nowag_p, proxy_start
from .scoring import output_loss, proxy_loss
from .settings import SolverSettings
from .sparsegpt import check_hessian

__all__ = ["ARMORFactors", "factorize", "nowag_p", "output_loss", "proxy_loss"]


@dataclass(frozen=True)
class ARMORFactors:
    """A factorised weight ``W_hat = blockdiag(A) @ core @ blockdiag(B)`` (original units, fp32).

    :ivar A: ``[p, b, b]`` output wrapper (row norms folded in)
    :ivar B: ``[q, b, b]`` input wrapper (column norms folded in)
    :ivar core: ``[m, n]`` 2:4 sparse core (zeros off ``mask``), normalised units (the weight's
        NoWag normalisation for ``objective="proxy"``, the core's own for ``"output"``); original
        units when the Hessian failed (``num_h_failures > 0``, identity wrappers)
    :ivar mask: bool ``[m, n]``, exactly 2 of every 4 consecutive input columns per row
    :ivar loss_history: the objective's relative loss (proxy loss, or output error
        ``tr(E H E^T) / tr(W H W^T)``, with ``H`` ridged by ``output_damping`` if non-zero);
        element 0 is the starting point's (NoWag-P's or SparseGPT's), element ``k`` the loss after
        iteration ``k``
    :ivar best_iteration: index into ``loss_history`` of the returned iterate
    :ivar wrapper_block_size: the block size used (may be smaller than requested)
    :ivar num_fallbacks: singular block or 2x2 systems that kept their old value (and a
        non-finite loss, which stops the descent)
    :ivar num_sanitized_h: entries of ``h`` that were non-finite or non-positive
    :ivar objective: ``"proxy"`` or ``"output"``
    :ivar init: the starting point actually used (``"nowag"`` after a Hessian failure)
    :ivar num_damping_increases: times the Hessian damping was multiplied by 10 to factorise it
    :ivar num_h_failures: 1 when ``H`` was not positive definite after every damping increase: no
        SparseGPT and no output-aware descent; the result is NoWag-P's (identity wrappers)
    :ivar matmul_precision: the inputs of the descent's products with ``H``: ``"bfloat16"``
        (``matmul_precision`` asked for it, or ``"auto"`` found native bfloat16 on the weight's
        device) or ``"float32"`` (also when there was no output-aware descent)
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
    objective: str = "proxy"
    init: str = "nowag"
    num_damping_increases: int = 0
    num_h_failures: int = 0
    matmul_precision: str = "float32"

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


def _descend(
    objective: Objective,
    it: Iterate,
    initial_loss: float,
    *,
    num_iterations: int,
    mode: str,
    lr: float,
    cg_steps: int,
    update_mask: bool,
    patience: int,
    rtol: float,
    atol: float,
    seed: int,
    callback: Callable[[int, float], None] | None,
) -> tuple[list[float], Iterate, int, int]:
    """The BCD loop (docs/algorithm.md, "Block coordinate descent"): continuous step, discrete
    step, keep the best.

    :return: (loss history, best iterate, its index in the history, fallback count)
    """
    history = [initial_loss]
    best, best_index, fallbacks = it.clone(), 0, 0
    generator = torch.Generator(device=it.A.device).manual_seed(seed)
    adam = AdamState(lr=lr)
    stale = 0
    for k in range(1, num_iterations + 1):
        if history[best_index] == 0.0:
            break
        if mode == "exact":
            fallbacks += objective.update_A(it) + objective.update_B(it)
            objective.update_core(it, cg_steps)
        else:
            grad_A, grad_B, grad_S, _ = objective.gradients(it)
            adam.step(it, (grad_A, grad_B, grad_S))
        if update_mask:
            failed, touched = objective.discrete_step(it, generator)
            fallbacks += failed
            adam.reset_core_moments(touched)
        loss = objective.loss(it)
        if not math.isfinite(loss):
            fallbacks += 1
            break
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
    return history, best, best_index, fallbacks


def _check_data(settings: SolverSettings, H: torch.Tensor | None, h: torch.Tensor | None) -> None:
    if H is None and settings.needs_hessian:
        raise ARMORValueError(
            f"objective={settings.objective!r} with init={settings.start!r} needs the layer "
            "Hessian H = X^T X / N ([in_features, in_features]); pass H=..."
        )
    if h is None and settings.objective == "proxy":
        raise ARMORValueError("objective='proxy' needs h (mean x^2 per input channel)")


def factorize(
    weight: torch.Tensor,
    h: torch.Tensor | None = None,
    settings: SolverSettings | None = None,
    *,
    H: torch.Tensor | None = None,
    callback: Callable[[int, float], None] | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    **overrides: Any,
) -> ARMORFactors:
    """Factorise ``weight`` as ``A · (W' ⊙ M) · B`` with ARMOR's block coordinate descent.

    Starts at ``settings.init`` (identity wrappers), alternates a continuous step on ``(A, B, W')``
    and a discrete 2:4 step, and returns the best iterate seen, so ``final_loss <= initial_loss``:
    with ``objective="proxy"`` and NoWag-P that is the paper's guarantee; with ``"output"`` and
    SparseGPT the result is never worse than SparseGPT on SparseGPT's own objective
    (docs/algorithm.md, "The output objective").

    :param weight: ``[m, n]`` any float dtype (computed in fp32; never modified)
    :param h: ``[n]`` mean of ``x_j^2`` over calibration tokens; non-finite or non-positive
        entries are replaced by the mean of the valid ones (counted in ``num_sanitized_h``).
        May be ``None`` with ``objective="output"`` (then ``diag(H)``)
    :param settings: every solver knob (:class:`SolverSettings`, default ``SolverSettings()``)
    :param H: ``[n, n]`` layer Hessian ``X^T X / N`` (any positive scale), finite; needed for
        ``objective="output"`` or ``init="sparsegpt"``
    :param callback: called as ``callback(iteration, loss)`` after every iteration
    :param rtol: relative improvement that resets ``patience``
    :param atol: absolute improvement that resets ``patience``
    :param overrides: :class:`SolverSettings` fields applied on top of ``settings``, e.g.
        ``factorize(W, h, objective="proxy", num_iterations=100)``
    """
    settings = (settings or SolverSettings()).replace(**overrides)
    _check_data(settings, H, h)
    init = settings.start
    start_time = time.perf_counter()
    W = check_weight(weight)
    m, n = W.shape
    if h is None:
        h = check_hessian(H, n).diagonal()
    h, num_sanitized = sanitize_h(h, n)
    h = h.to(W.device)
    b = settings.block_size_for(m, n)
    H = H.to(W.device) if isinstance(H, torch.Tensor) else H
    precision = "float32"  # of the products with H; the proxy objective has none
    if settings.objective == "proxy":
        start = proxy_start(W, h, b, H, init, settings.dampening_frac, settings.groups_per_tile)
    else:
        assert H is not None  # _check_data: the output objective always has H
        precision = resolve_matmul_precision(settings.matmul_precision, W.device)
        start = output_start(
            W, h, b, H, init, settings.dampening_frac, settings.output_damping,
            settings.output_damping_kind, precision,
        )  # fmt: skip

    history, best, best_index, fallbacks = [start.loss], start.iterate, 0, 0
    low_precision = start.objective is not None and precision != "float32"
    initial = start.iterate.clone() if low_precision else start.iterate
    if start.objective is not None:
        history, best, best_index, fallbacks = _descend(
            start.objective,
            start.iterate,
            start.loss,
            num_iterations=settings.num_iterations,
            mode=settings.update_mode,
            lr=settings.learning_rate,
            cg_steps=settings.cg_steps,
            update_mask=settings.update_mask,
            patience=settings.patience,
            rtol=rtol,
            atol=atol,
            seed=settings.seed,
            callback=callback,
        )
        if low_precision and best_index > 0:  # the guarantee, on float32 losses
            history[best_index] = start.objective.exact_loss(best)
            if not history[best_index] <= history[0]:
                best, best_index = initial, 0
    A, B, core = start.fold(best)
    return ARMORFactors(
        A=A,
        B=B,
        core=core,
        mask=best.M.clone(),
        loss_history=tuple(history),
        best_iteration=best_index,
        wrapper_block_size=b,
        mode=settings.update_mode,
        num_fallbacks=fallbacks,
        num_sanitized_h=num_sanitized,
        seconds=time.perf_counter() - start_time,
        objective=settings.objective,
        init=start.init,
        num_damping_increases=start.num_damping_increases,
        num_h_failures=start.num_h_failures,
        matmul_precision=precision if start.objective is not None else "float32",
    )
