"""torch.distributed plumbing for :class:`~armor_modifier.modifier.ARMORModifier`.

Same engine as llm-compressor 0.14's GPTQModifier (ARCHITECTURE.md fact 12): every rank calibrates
on its shard of the data; the ``x^2`` sums, the token counts (and ``X^T X`` for the output
objective) are all-reduced, so every rank holds the statistics of the whole calibration set. The
sums are float64, so the float32 ``h`` and ``H`` the solver receives do not depend on how the data
was split (bit for bit in ``tests/test_distributed.py``; see ``stats.py`` for why it matters);
matrices are assigned to ranks with ``compressed_tensors.distributed.greedy_bin_packing`` by cost
``m n b``; each rank factorises its share, and the owner broadcasts ``A``, ``B`` and the core so
that every rank ends with the same model. Works with gloo (CPU) and nccl (GPU): tensors travel on
the module's execution device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from compressed_tensors.distributed import greedy_bin_packing, wait_for_comms
from compressed_tensors.offload.dist_utils import is_distributed
from torch import distributed as dist

from armor_modifier.core import ARMORFactors
from armor_modifier.core.errors import ARMORCompressionError

from .report import ARMORModuleResult
from .stats import InputStatistics

if TYPE_CHECKING:
    from torch import nn

    from .base import ARMORModifier

__all__ = [
    "SOLVER_ERRORS",
    "all_gather_objects",
    "compress_distributed",
    "assign_owners",
    "broadcast_tensors",
    "is_distributed",
    "rank_and_world",
    "reduce_statistics",
]

T = TypeVar("T")
#: Errors of the solver that abort compression with :class:`ARMORCompressionError`.
SOLVER_ERRORS = (RuntimeError, ValueError, TypeError)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def reduce_statistics(stats: Sequence[InputStatistics]) -> None:
    """All-reduce (sum) every statistic's tensors (``sums``, ``count``, ``gram``) in place.

    Every rank must pass the same modules in the same order, with the same settings. The float64
    sums make the reduction order (the backend's, not ours) irrelevant after rounding to float32.
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


def compress_distributed(modifier: ARMORModifier, modules: list[nn.Linear]) -> None:
    """Compress ``modules`` (the same list on every rank) with the work spread over the ranks.

    Statistics are all-reduced, each matrix is solved by one owner (greedy bin packing by cost
    ``m n b``), the owner broadcasts ``A``, ``B`` and the core, and every rank applies them, so all
    ranks end with the same model. A failure on any rank raises on every rank.
    """
    rank, world = rank_and_world()
    stats = modifier.statistics
    for module in modules:
        if module not in stats:
            stats[module] = modifier.empty_statistics(module)
    reduce_statistics([stats[m] for m in modules])
    modifier.require_tokens(modules)
    rank_to_modules, owner = assign_owners(modules, modifier.cost, world)

    solved: dict[nn.Linear, ARMORFactors] = {}
    failure = None
    for module in rank_to_modules[rank]:
        try:
            solved[module] = modifier.solve(module)
        except SOLVER_ERRORS as err:
            failure = (modifier.name_of(module), repr(err))
            break
    failures = [f for f in all_gather_objects(failure) if f is not None]
    if failures:
        name, cause = failures[0]
        raise ARMORCompressionError(name, modifier.compressed_modules, cause)

    local = {}
    for module in modules:
        name = modifier.name_of(module)
        A, B, core = _buffers(modifier, module, solved.get(module))
        broadcast_tensors([A, B, core], src=owner[module])
        modifier.apply(module, A, B, core)
        if module in solved:
            local[name] = modifier.result(module, solved[module], rank=rank)
    gathered: dict[str, ARMORModuleResult] = {}
    for part in all_gather_objects(local):
        gathered.update(part)
    for module in modules:
        del stats[module]
        modifier.record(gathered[modifier.name_of(module)], log=owner[module] == rank)


def _buffers(
    modifier: ARMORModifier, module: nn.Linear, factors: ARMORFactors | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The owner's ``(A, B, core)`` fp32, or zero buffers of the same shapes to receive into."""
    from compressed_tensors.offload import get_execution_device

    where = {"device": get_execution_device(module), "dtype": torch.float32}
    if factors is not None:
        A, B, core = (t.to(**where).contiguous() for t in (factors.A, factors.B, factors.core))
        return A, B, core
    m, n = module.weight.shape
    b = modifier.solver_settings.block_size_for(m, n)
    return (
        torch.zeros(m // b, b, b, **where),
        torch.zeros(n // b, b, b, **where),
        torch.zeros(m, n, **where),
    )
