"""The solver's mutable iterate ``(A, B, W', M)``, its dense reconstruction, the interface every
objective implements (:class:`Objective`) and a descent's starting point (:class:`Start`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .blockdiag import left_blockdiag, right_blockdiag

__all__ = ["Fold", "Iterate", "Objective", "Start", "identity_fold", "reconstruct"]


@dataclass
class Iterate:
    """One point of the block coordinate descent.

    :ivar A: ``[p, b, b]`` output wrapper blocks
    :ivar B: ``[q, b, b]`` input wrapper blocks
    :ivar Wp: ``[m, n]`` core values (only entries under ``M`` matter)
    :ivar M: bool ``[m, n]`` 2:4 mask
    """

    A: torch.Tensor
    B: torch.Tensor
    Wp: torch.Tensor
    M: torch.Tensor

    @property
    def S(self) -> torch.Tensor:
        """The sparse core ``W' * M``, ``[m, n]``."""
        return self.Wp * self.M

    def clone(self) -> Iterate:
        return Iterate(self.A.clone(), self.B.clone(), self.Wp.clone(), self.M.clone())


def reconstruct(A: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``blockdiag(A) @ S @ blockdiag(B)``, ``[m, n]``."""
    return right_blockdiag(left_blockdiag(A, S), B)


class Objective(Protocol):
    """What the block coordinate descent needs from an objective (see :class:`DiagonalProxy`)."""

    def loss(self, it: Iterate) -> float: ...
    def exact_loss(self, it: Iterate) -> float: ...
    def update_A(self, it: Iterate) -> int: ...
    def update_B(self, it: Iterate) -> int: ...
    def update_core(self, it: Iterate, steps: int) -> None: ...
    def discrete_step(
        self, it: Iterate, generator: torch.Generator
    ) -> tuple[int, torch.Tensor]: ...
    def gradients(self, it: Iterate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]: ...


#: Maps an iterate to ``(A, B, core)`` in the weight's original units.
Fold = Callable[[Iterate], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class Start:
    """The starting point of a descent and how to express its iterates in original units.

    ``objective is None`` means no descent: ``iterate`` (original units) is the answer.
    """

    objective: Objective | None
    iterate: Iterate
    loss: float
    fold: Fold
    init: str
    num_damping_increases: int = 0
    num_h_failures: int = 0


def identity_fold(it: Iterate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return it.A, it.B, it.S
