"""What the output objective keeps between its updates (``core/output.py``, "State in P's
space"), and the dot products its line searches use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .iterate import Iterate

__all__ = ["KeptState", "dot", "dot_by_rows", "gram", "row_dots"]


def dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """``<x, y>`` accumulated in float64."""
    return float((x * y).sum(dtype=torch.float64))


def dot_by_rows(x: torch.Tensor, y: torch.Tensor) -> float:
    """``<x, y>``: each row (first index) summed in the tensors' dtype, the row sums in float64
    (a sum over one row of a layer is accurate in float32, and several times faster: the loss
    and the line searches use it)."""
    return float(row_dots(x, y).sum(dtype=torch.float64))


def row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[r]`` dot products of the rows of ``x`` and ``y`` (first index; the rest flattened), in
    their dtype, without forming ``x * y`` (``vecdot``: about 4x faster on CPU than the einsum
    it replaced, which ran as ``r`` one-row matrix products)."""
    rows = x.shape[0]
    return torch.linalg.vecdot(x.reshape(rows, -1), y.reshape(rows, -1))


def gram(A: torch.Tensor) -> torch.Tensor:
    """``A_I^T A_I`` per block, ``[p, b, b]`` for ``A [p, b, b]``."""
    return torch.bmm(A.transpose(1, 2), A)


@dataclass
class KeptState:
    """``P = S B``, ``PH = P H`` and ``R = A^T (E H)`` (each ``[m, n]``) of the iterate whose
    tensors are ``key`` (compared by identity); the objective's steps update them in place."""

    key: tuple[torch.Tensor, ...]
    P: torch.Tensor
    PH: torch.Tensor
    R: torch.Tensor

    def matches(self, it: Iterate) -> bool:
        return all(a is b for a, b in zip(self.key, (it.A, it.B, it.Wp, it.M), strict=True))
