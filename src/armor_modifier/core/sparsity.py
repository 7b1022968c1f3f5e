"""2:4 masks: in every row, every 4 consecutive input columns keep exactly 2 entries.

Shapes: masks and scores are ``[m, n]`` with ``4 | n``; groups are ``reshape(m, n // 4, 4)``.
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTS",
    "count_broken_groups",
    "group_counts",
    "is_2_of_4",
    "pattern_supports",
    "top2_of_4_mask",
]

#: The 6 two-element supports of a 4-group, in a fixed order, ``[6, 2]``.
SUPPORTS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


def top2_of_4_mask(score: torch.Tensor) -> torch.Tensor:
    """Keep, in every row and 4-column group, the 2 entries with the largest score.

    :param score: ``[m, n]``, ``4 | n``
    :return: bool ``[m, n]``, exactly 2 ``True`` per group (ties broken by ``topk``)
    """
    m, n = score.shape
    groups = score.reshape(m, n // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(m, n)


def pattern_supports(device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`SUPPORTS` indexed by 4-bit group pattern (bit ``k`` = column ``k`` kept).

    :return: ``positions [16, 2]`` int64 (the kept columns of each 2-bit pattern, zeros elsewhere)
        and ``valid [16]`` bool (the pattern keeps exactly 2 columns)
    """
    bits = (1 << SUPPORTS).sum(-1)
    positions = torch.zeros(16, 2, dtype=torch.int64).index_copy_(0, bits, SUPPORTS)
    valid = torch.zeros(16, dtype=torch.bool).index_fill_(0, bits, True)
    return positions.to(device), valid.to(device)


def group_counts(mask: torch.Tensor) -> torch.Tensor:
    """``True`` entries in each group of 4 columns: bool ``[m, n]`` -> int ``[m, n/4]``."""
    m, n = mask.shape
    return mask.reshape(m, n // 4, 4).sum(-1)


def count_broken_groups(mask_or_weight: torch.Tensor) -> int:
    """Number of 4-groups holding more than 2 non-zeros (a bool mask or a weight of any dtype,
    FP8 included).

    :param mask_or_weight: ``[m, n]``, ``4 | n``
    """
    t = mask_or_weight
    if t.is_floating_point() and t.element_size() == 1:
        t = t.float()  # FP8 has no comparison kernels on CPU
    return int((group_counts(t != 0) > 2).sum())


def is_2_of_4(mask: torch.Tensor) -> bool:
    """Whether a bool mask holds exactly 2 ``True`` in every row's 4-groups."""
    m, n = mask.shape
    if n % 4:
        return False
    return bool((mask.reshape(m, n // 4, 4).sum(-1) == 2).all())
