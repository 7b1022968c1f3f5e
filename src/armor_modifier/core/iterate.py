"""The solver's mutable iterate ``(A, B, W', M)`` and its dense reconstruction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockdiag import left_blockdiag, right_blockdiag

__all__ = ["Iterate", "reconstruct"]


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
