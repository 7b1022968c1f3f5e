"""The paper's continuous step: one joint Adam step on ``A``, ``B`` and ``W'`` (mask fixed).

Adam is not guaranteed to lower the loss; the solver keeps the best iterate. Unlike the reference
code, moments of core entries rewritten by the discrete step are reset (they are stale there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .iterate import Iterate

__all__ = ["AdamState"]


@dataclass
class AdamState:
    """Moments for ``(A, B, W')`` and the step count."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step_count: int = 0
    moments: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def step(self, it: Iterate, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Update ``it.A``, ``it.B``, ``it.Wp`` in place from their gradients."""
        params = [it.A, it.B, it.Wp]
        if not self.moments:
            self.moments = [(torch.zeros_like(x), torch.zeros_like(x)) for x in params]
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        new = []
        for x, g, (m, v) in zip(params, grads, self.moments, strict=True):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            new.append(x - self.lr * (m / c1) / ((v / c2).sqrt() + self.eps))
        it.A, it.B, it.Wp = new

    def reset_core_moments(self, touched: torch.Tensor) -> None:
        """Zero the ``W'`` moments where ``touched [m, n]`` is true."""
        if self.moments:
            m, v = self.moments[2]
            m.masked_fill_(touched, 0.0)
            v.masked_fill_(touched, 0.0)
