"""torch.distributed plumbing for :class:`~armor_modifier.modifier.ARMORModifier`.

Same engine as llm-compressor 0.14's GPTQModifier (ARCHITECTURE.md fact 12): every rank calibrates
on its shard of the data; the ``x^2`` sums, the token counts (and ``X^T X`` for the output
objective) are all-reduced, so every rank holds the statistics of the whole calibration set;
matrices are assigned to ranks with ``compressed_tensors.distributed.greedy_bin_packing`` by cost
``m n b``; each rank factorises its share, and the owner broadcasts ``A``, ``B`` and the core so
that every rank ends with the same model. Works with gloo (CPU) and nccl (GPU): tensors travel on
the module's execution device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from compressed_tensors.distributed import greedy_bin_packing, wait_for_comms
from compressed_tensors.offload.dist_utils import is_distributed
from torch import distributed as dist

from .modifier_stats import InputStatistics

__all__ = [
    "all_gather_objects",
    "assign_owners",
    "broadcast_tensors",
    "is_distributed",
    "rank_and_world",
    "reduce_statistics",
]

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def reduce_statistics(stats: Sequence[InputStatistics]) -> None:
    """All-reduce (sum) every statistic's tensors (``sums``, ``count``, ``gram``) in place.

    Every rank must pass the same modules in the same order, with the same settings.
    """
    pending = [
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        for stat in stats
        for tensor in stat.tensors()
    ]
    wait_for_comms(pending)


def assign_owners(
    items: Sequence[T], cost: Callable[[T], float], world_size: int
) -> tuple[list[list[T]], dict[T, int]]:
    """Greedy bin packing of ``items`` (not modified) over ranks by ``cost``.

    :return: ``(rank -> items, item -> rank)``; deterministic for a given input order
    """
    _, rank_to_items, item_to_rank = greedy_bin_packing(list(items), world_size, cost)
    return rank_to_items, item_to_rank


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int) -> None:
    """Broadcast ``tensors`` (contiguous, same shapes on every rank) from rank ``src`` in place."""
    pending = [dist.broadcast(t, src=src, async_op=True) for t in tensors]
    wait_for_comms(pending)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; small objects only)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
