"""The per-Linear engine under the modifiers: statistics in, ARMOR factors out, written back.

:class:`LinearCompressor` owns what compressing a set of target Linears needs: their names, one
:class:`SolverSettings`, the input statistics collected so far, the results and the progress bar.
It knows nothing of llm-compressor's lifecycle (the modifier calls it) and works alone or under
torch.distributed: there the statistics are all-reduced, each matrix is solved by one owner
(greedy bin packing by cost ``m n b``), the owner broadcasts ``A``, ``B`` and the core, and every
rank applies them, so all ranks end with the same model (bit for bit with the single process:
``tests/test_distributed.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressed_tensors.offload import get_execution_device
from compressed_tensors.utils import align_module_device, update_offload_parameter
from loguru import logger
from torch import nn
from tqdm import tqdm

from armor_modifier.allocator import release_free_memory
from armor_modifier.core import ARMORFactors, SolverSettings, factorize
from armor_modifier.core.errors import ARMORCompressionError, ARMORValueError
from armor_modifier.core.settings import derived_seed
from armor_modifier.runtime import attach_wrappers, is_armor_linear

from .collectives import (
    all_gather_objects,
    all_reduce_sum,
    assign_owners,
    broadcast_tensors,
    is_distributed,
    rank_and_world,
)
from .report import ARMORModuleResult
from .stats import InputStatistics

__all__ = ["SOLVER_ERRORS", "LinearCompressor", "apply_factors"]

#: Errors of the solver that abort compression with :class:`ARMORCompressionError`.
SOLVER_ERRORS = (RuntimeError, ValueError, TypeError)


def apply_factors(module: nn.Linear, A: torch.Tensor, B: torch.Tensor, core: torch.Tensor) -> None:
    """Write ``core`` into ``module.weight`` (the model's dtype) and hook ``A``, ``B`` into its
    forward (``A``: ``[m/b, b, b]``, ``B``: ``[n/b, b, b]``, ``core``: ``[m, n]``)."""
    with torch.no_grad():
        update_offload_parameter(module, "weight", core.to(module.weight.dtype))
        with align_module_device(module):
            attach_wrappers(module, A, B)


class LinearCompressor:
    """Compresses target Linears from their input statistics, in model order.

    :param names: every target Linear and its name in the model, in model order.
    :param settings: the solver settings (with the block size the budget gave, if any).
    :param from_budget: whether the block size came from ``max_wrapper_overhead`` (reported).
    """

    def __init__(
        self, names: dict[nn.Linear, str], settings: SolverSettings, from_budget: bool
    ) -> None:
        self.names = names
        self.settings = settings
        self.from_budget = from_budget
        self.statistics: dict[nn.Linear, InputStatistics] = {}
        self.results: dict[str, ARMORModuleResult] = {}
        self.compressed: list[str] = []
        self._progress: tqdm | None = None

    # ---- statistics ------------------------------------------------------------------------

    def empty_statistics(self, module: nn.Linear) -> InputStatistics:
        """Zeroed statistics for ``module`` (with ``X^T X`` when the settings need ``H``)."""
        return InputStatistics.empty(
            module.in_features,
            get_execution_device(module),
            with_gram=self.settings.needs_hessian,
        )

    def add_input(self, module: nn.Linear, x: torch.Tensor) -> None:
        """Forward-hook body: add ``x`` (the module's input) to its statistics."""
        if is_armor_linear(module):
            return
        if module not in self.statistics:
            self.statistics[module] = self.empty_statistics(module)
        self.statistics[module].add(x)

    def reset_statistics(self, modules: Sequence[nn.Linear]) -> None:
        """Start ``modules``' statistics afresh (within-layer propagation re-collects them)."""
        for module in modules:
            self.statistics[module] = self.empty_statistics(module)

    def pending(self) -> list[nn.Linear]:
        """Targets not compressed yet, in model order."""
        done = set(self.compressed)
        return [m for m, name in self.names.items() if name not in done]

    # ---- compression -----------------------------------------------------------------------

    def compress(self, modules: list[nn.Linear] | None = None) -> None:
        """Factorize, write back and wrap ``modules`` (default: every calibrated, uncompressed
        target), in model order; under torch.distributed the work is shared across ranks."""
        if modules is None:
            modules = [m for m in self.pending() if m in self.statistics]
        if not modules:
            return
        try:
            if is_distributed():
                self._compress_distributed(modules)
                return
            self._require_tokens(modules)
            for module in modules:
                try:
                    factors = self.solve(module)
                except SOLVER_ERRORS as err:
                    raise ARMORCompressionError(
                        self.names[module], self.compressed, repr(err)
                    ) from err
                apply_factors(module, factors.A, factors.B, factors.core)
                self._record(self._result(module, factors))
                del self.statistics[module], factors
                release_free_memory()  # the solve's freed temporaries (allocator.py)
        except BaseException:
            self.close()
            raise

    def solve(self, module: nn.Linear) -> ARMORFactors:
        """Run the solver on one target from its statistics (the module is not changed); the
        seed is the settings' plus ``crc32`` of the module's name."""
        name = self.names[module]
        if is_armor_linear(module):
            raise ARMORValueError(
                "it already carries ARMOR wrappers (two ARMORModifiers target it); give each "
                "ARMORModifier disjoint targets"
            )
        stats = self.statistics[module]
        settings = self.settings.replace(seed=derived_seed(self.settings.seed, name, 63))
        with torch.no_grad(), align_module_device(module):
            return factorize(module.weight, stats.mean(), settings, H=stats.hessian())

    def restore(
        self, module: nn.Linear, factors: tuple[torch.Tensor, ...], result: ARMORModuleResult
    ) -> None:
        """Apply stored ``(A, B, core)`` to ``module`` and record ``result`` as if solved here."""
        device = get_execution_device(module)
        A, B, core = (t.to(device) for t in factors)
        apply_factors(module, A, B, core)
        self.statistics.pop(module, None)
        self._record(result, log=False)

    def close(self) -> None:
        """Close the progress bar (idempotent)."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _result(self, module: nn.Linear, factors: ARMORFactors, rank: int = 0) -> ARMORModuleResult:
        return ARMORModuleResult.from_factors(
            self.names[module],
            factors,
            self.settings.wrapper_block_size or factors.wrapper_block_size,
            self.statistics[module].num_tokens,
            rank=rank,
            from_budget=self.from_budget,
        )

    def _record(self, result: ARMORModuleResult, log: bool = True) -> None:
        self.results[result.name] = result
        self.compressed.append(result.name)
        if log:
            logger.info(result.log_line())
        if self._progress is None:
            self._progress = tqdm(total=len(self.names), desc="ARMOR", unit="module")
        self._progress.update(1)

    def _require_tokens(self, modules: Sequence[nn.Linear]) -> None:
        empty = [
            self.names[m]
            for m in modules
            if m not in self.statistics or self.statistics[m].num_tokens == 0
        ]
        if empty:
            raise ARMORValueError(
                f"ARMOR received no calibration tokens for {len(empty)} modules: {empty}. The "
                "calibration set is empty or these modules never ran; pass a non-empty `dataset` "
                "to oneshot or add them to `ignore`."
            )

    def _cost(self, module: nn.Linear) -> int:
        m, n = module.weight.shape
        return m * n * self.settings.block_size_for(m, n)

    # ---- torch.distributed -----------------------------------------------------------------

    def _compress_distributed(self, modules: list[nn.Linear]) -> None:
        """Reduce the statistics, solve each matrix on its owner, broadcast, apply everywhere.
        A failure on any rank raises on every rank."""
        rank, world = rank_and_world()
        for module in modules:
            if module not in self.statistics:
                self.statistics[module] = self.empty_statistics(module)
        all_reduce_sum([t for m in modules for t in self.statistics[m].tensors()])
        self._require_tokens(modules)
        rank_to_modules, owner = assign_owners(modules, self._cost, world)

        solved: dict[nn.Linear, ARMORFactors] = {}
        failure = None
        for module in rank_to_modules[rank]:
            try:
                solved[module] = self.solve(module)
            except SOLVER_ERRORS as err:
                failure = (self.names[module], repr(err))
                break
            release_free_memory()
        failures = [f for f in all_gather_objects(failure) if f is not None]
        if failures:
            name, cause = failures[0]
            raise ARMORCompressionError(name, self.compressed, cause)

        local = {}
        for module in modules:
            A, B, core = self._buffers(module, solved.get(module))
            broadcast_tensors([A, B, core], src=owner[module])
            apply_factors(module, A, B, core)
            if module in solved:
                local[self.names[module]] = self._result(module, solved[module], rank=rank)
        gathered: dict[str, ARMORModuleResult] = {}
        for part in all_gather_objects(local):
            gathered.update(part)
        for module in modules:
            del self.statistics[module]
            self._record(gathered[self.names[module]], log=owner[module] == rank)

    def _buffers(
        self, module: nn.Linear, factors: ARMORFactors | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The owner's ``(A, B, core)`` fp32, or zero buffers of the same shapes to receive into."""
        where = {"device": get_execution_device(module), "dtype": torch.float32}
        if factors is not None:
            A, B, core = (t.to(**where).contiguous() for t in (factors.A, factors.B, factors.core))
            return A, B, core
        m, n = module.weight.shape
        b = self.settings.block_size_for(m, n)
        return (
            torch.zeros(m // b, b, b, **where),
            torch.zeros(n // b, b, b, **where),
            torch.zeros(m, n, **where),
        )
