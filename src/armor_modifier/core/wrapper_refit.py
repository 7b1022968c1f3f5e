"""Refit an ARMOR layer's full-precision wrappers to its quantized core, pure torch.

Glossary: ``A [p, b, b]`` and ``B [q, b, b]`` the layer's wrappers, ``S [m, n]`` its 2:4 core
before quantization, ``Q [m, n]`` the same core quantized (same zeros), ``H [n, n]`` the Hessian
of the core's inputs ``z = B x`` (``Z^T Z / N``, what a Hessian hook on the core sees), ``R
[q, b, b]`` a block-diagonal correction on ``z``.

The layer computes ``A S z``; quantizing the core alone gives ``A Q z``. With the quantized core
fixed (it is what the checkpoint stores, on its grid), the wrappers are refitted to the layer's
unquantized output on the calibration inputs::

    min over A', R:  tr((A' Q R - A S) H (A' Q R - A S)^T) / tr(A S H (A S)^T)

This is :class:`~.output.OutputObjective`'s problem with target ``W = A S``, core ``Q`` and the
updates of ``A`` (exact per block) and ``B`` (conjugate gradient, exact line search) only, started
from ``A' = A``, ``R = I``; each update is kept only where it does not raise the loss, so the
loss never rises above that of ``A Q z``. The layer then computes ``A' Q (R B) x``: the new input
wrapper ``R B`` is block-diagonal with the same blocks, and the core is untouched.

Why it helps: the wrappers can undo what rounding does to whole rows and columns within a block
(a group scale that is a little off shows up as a row or column gain), and they see the layer's
actual output error, which GPTQ's row-by-row compensation does not. Measured effect:
docs/results.md (the GPTQ sections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockdiag import identity_blocks, left_blockdiag
from .errors import ARMORValueError
from .iterate import Iterate
from .output import OutputObjective
from .scoring import damped

__all__ = ["REFIT_RIDGE", "WrapperRefit", "refit_wrappers"]

#: ridge ``REFIT_RIDGE * mean(diag H)`` added to ``H`` for the refit, against singular blocks
#: (0 and 0.01 gave the same added error to three digits in benchmarks/gptq_layer_check.py)
REFIT_RIDGE = 0.01


@dataclass(frozen=True)
class WrapperRefit:
    """The refitted wrappers and the relative output error before and after.

    :ivar A: ``[p, b, b]`` new output wrapper
    :ivar B: ``[q, b, b]`` new input wrapper ``R B``
    :ivar loss_before: ``L`` of ``(A, Q, B)``, relative to ``tr(A S H (A S)^T)`` (``H`` with the
        ridge)
    :ivar loss_after: ``L`` of the result (never above ``loss_before``)
    """

    A: torch.Tensor
    B: torch.Tensor
    loss_before: float
    loss_after: float


def refit_wrappers(
    A: torch.Tensor,
    B: torch.Tensor,
    S: torch.Tensor,
    Q: torch.Tensor,
    H: torch.Tensor,
    iterations: int,
    *,
    ridge: float = REFIT_RIDGE,
) -> WrapperRefit:
    """Refit ``A`` and ``B`` so that ``A' Q (R B)`` matches ``A S B`` on the inputs of ``H``.

    Computed in float64; the results have ``A``'s and ``B``'s dtypes.

    :param A: ``[p, b, b]`` output wrapper
    :param B: ``[q, b, b]`` input wrapper (only multiplied by ``R`` at the end)
    :param S: ``[m, n]`` core before quantization
    :param Q: ``[m, n]`` quantized core, zero wherever ``S`` is
    :param H: ``[n, n]`` Hessian of the core's inputs ``B x``
    :param iterations: passes of (update ``A``, update ``B``); 0 returns the wrappers unchanged
    :param ridge: ``ridge * mean(diag H)`` is added to ``H``'s diagonal
    """
    m, n = S.shape
    if A.dim() != 3 or B.dim() != 3 or A.shape[1] != B.shape[1]:
        raise ARMORValueError(
            f"wrappers must be [k, b, b] with one b, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    b = A.shape[1]
    if A.shape[0] * b != m or B.shape[0] * b != n or Q.shape != S.shape or H.shape != (n, n):
        raise ARMORValueError(
            f"shapes do not fit: A {tuple(A.shape)}, B {tuple(B.shape)}, S {tuple(S.shape)}, "
            f"Q {tuple(Q.shape)}, H {tuple(H.shape)}"
        )
    if iterations < 0:
        raise ARMORValueError(f"iterations={iterations}: use 0 (no refit) or more")
    A64, S64, Q64, H64 = (t.double() for t in (A, S, Q, H))
    H64 = damped((H64 + H64.T) / 2, ridge, "identity", 0.0)
    objective = OutputObjective(left_blockdiag(A64, S64), H64, b)
    R0 = identity_blocks(n // b, b, dtype=torch.float64, device=H64.device)
    it = Iterate(A64.clone(), R0, Q64 * objective.d, Q64 != 0)
    before = objective.loss(it)
    for _ in range(iterations):
        objective.update_A(it)
        objective.update_B(it)
    after = objective.loss(it)
    # the objective's B acts on z in H-diagonal units: R = diag(d) B~ diag(d)^-1, blockwise
    d = objective.d.reshape(n // b, b)
    R = it.B * d[:, :, None] / d[:, None, :]
    new_B = torch.bmm(R, B.double())
    return WrapperRefit(it.A.to(A.dtype), new_B.to(B.dtype), before, after)
