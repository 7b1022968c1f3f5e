"""The torch.distributed collectives the modifiers use (a leaf: it imports nothing of the
package).

Every rank calibrates on its shard of the data; the statistics are all-reduced in float64 (so the
float32 ``h`` and ``H`` the solver receives do not depend on how the data was split), work is
assigned to ranks by greedy bin packing, and owners broadcast their results. Works with gloo (CPU)
and nccl (GPU): tensors travel on the module's execution device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from compressed_tensors.distributed import greedy_bin_packing, wait_for_comms
from compressed_tensors.offload.dist_utils import is_distributed
from torch import distributed as dist

__all__ = [
    "all_gather_objects",
    "assign_owners",
    "broadcast_tensors",
    "gather_owners",
    "is_distributed",
    "rank_and_world",
    "all_reduce_sum",
]

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """All-reduce (sum) ``tensors`` in place, e.g. every statistic's ``sums``, ``count``, ``gram``.

    Every rank must pass tensors of the same shapes in the same order. Float64 sums make the
    reduction order (the backend's, not ours) irrelevant after rounding to float32.
    """
    pending = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in tensors]
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


def gather_owners(mine: Sequence[str]) -> dict[str, int]:
    """``{name: rank}`` of the items every rank ran, from each rank's own record ``mine`` (the
    names of the items it ran; each item on one rank). A collective: every rank calls it."""
    owners: dict[str, int] = {}
    for rank, names in enumerate(all_gather_objects(list(mine))):
        for name in names:
            owners[name] = rank
    return owners
