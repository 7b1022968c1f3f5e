"""The output objective's start (docs/algorithm.md, "The output objective"): SparseGPT's (or
NoWag-P's) solution with identity wrappers, and the damping the objective's ``H`` needs."""

from __future__ import annotations

import torch

from .blockdiag import identity_blocks
from .iterate import Iterate, Start, identity_fold
from .output import OUTPUT_B_STEPS, OutputObjective
from .proxy import hessian_start
from .scoring import damped, output_loss
from .sparsegpt import check_hessian

__all__ = ["output_start"]


def output_start(
    W: torch.Tensor,
    h: torch.Tensor,
    b: int,
    H: torch.Tensor,
    init: str,
    dampening_frac: float,
    output_damping: float,
    output_damping_kind: str,
    matmul_precision: str = "float32",
) -> Start:
    """The output error from SparseGPT's (or NoWag-P's) solution, identity wrappers.

    ``H`` must factorise after damping (:func:`~.proxy.hessian_start`). If an increase was
    needed, ``H`` is materially indefinite (or too ill-conditioned for float32) and the objective
    uses ``H + lambda I`` with the ``lambda`` that worked. If every try fails, NoWag-P is returned
    without descent (SparseGPT needs the same factorisation). ``output_damping * mean(diag H)``
    (``output_damping_kind="identity"``) or ``output_damping * diag(H)`` (``"diagonal"``) is added
    to the objective's ``H`` (not to SparseGPT's).
    """
    m, n = W.shape
    Hs = check_hessian(H, n)
    first = hessian_start(W, h, Hs, init, dampening_frac)
    if first.fell_back:
        eye_p = identity_blocks(m // b, b, device=W.device)
        it = Iterate(eye_p, identity_blocks(n // b, b, device=W.device), first.core, first.mask)
        return Start(
            None,
            it,
            output_loss(W, Hs, first.core),
            identity_fold,
            first.init,
            first.num_damping_increases,
            first.num_h_failures,
        )
    increases = first.num_damping_increases
    Hs = damped(Hs, output_damping, output_damping_kind, first.damping if increases else 0.0)
    objective = OutputObjective(
        W, Hs, b, b_steps=OUTPUT_B_STEPS, matmul_precision=matmul_precision
    )
    it = objective.initial_iterate(first.core, first.mask)
    return Start(objective, it, objective.loss(it), objective.to_original, init, increases)
