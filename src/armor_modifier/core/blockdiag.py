"""Products with block-diagonal matrices, never materialising them.

A block-diagonal matrix of ``k`` blocks of size ``b`` is stored as ``[k, b, b]``; its dense form is
``torch.block_diag(*blocks)`` of shape ``[k*b, k*b]``.

- ``left_blockdiag(A, X)``  = ``blockdiag(A) @ X``   for ``A [p, b, b]``, ``X [p*b, c]``
- ``right_blockdiag(X, B)`` = ``X @ blockdiag(B)``   for ``X [r, q*b]``, ``B [q, b, b]``

Each costs ``2 * rows * cols * b`` FLOPs instead of ``2 * rows * cols * (rows or cols)``: the
``I``-th row slab of the product only involves block ``A_I`` (resp. the ``K``-th column slab only
``B_K``).
"""

from __future__ import annotations

import torch

__all__ = [
    "left_blockdiag",
    "right_blockdiag",
    "right_blockdiag_no_grad",
    "dense_blockdiag",
    "identity_blocks",
]


def left_blockdiag(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``blockdiag(blocks) @ x``.

    :param blocks: ``[p, b, b]``
    :param x: ``[p*b, c]``
    :return: ``[p*b, c]``
    """
    p, b, _ = blocks.shape
    return torch.bmm(blocks, x.reshape(p, b, -1)).reshape(p * b, -1)


def right_blockdiag(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)``.

    :param x: ``[r, q*b]``
    :param blocks: ``[q, b, b]``
    :return: ``[r, q*b]``
    """
    q, b, _ = blocks.shape
    r = x.shape[0]
    slabs = x.reshape(r, q, b).transpose(0, 1)  # [q, r, b]
    return torch.bmm(slabs, blocks).transpose(0, 1).reshape(r, q * b)


def right_blockdiag_no_grad(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """:func:`right_blockdiag` for the solver: the same values, written through a transposed
    view of the result instead of transposing a ``[q, r, b]`` product back (about 2x faster on
    CPU on a 512 x 4096 chunk at ``b = 128``: docs/results.md, layer scaling). No autograd (an
    ``out=`` product), so the modules' forwards use :func:`right_blockdiag`.

    :param x: ``[r, q*b]``
    :param blocks: ``[q, b, b]``
    :return: ``[r, q*b]``
    """
    q, b, _ = blocks.shape
    r = x.shape[0]
    out = torch.empty(r, q, b, dtype=torch.result_type(x, blocks), device=x.device)
    torch.bmm(x.reshape(r, q, b).transpose(0, 1), blocks, out=out.transpose(0, 1))
    return out.reshape(r, q * b)


def dense_blockdiag(blocks: torch.Tensor) -> torch.Tensor:
    """The dense ``[k*b, k*b]`` matrix of ``blocks [k, b, b]`` (for references and export)."""
    return torch.block_diag(*blocks.unbind(0))


def identity_blocks(k: int, b: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """``k`` identity blocks, ``[k, b, b]``."""
    return torch.eye(b, dtype=dtype, device=device).expand(k, b, b).clone()
