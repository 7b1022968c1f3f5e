"""Per-module results of :class:`~armor_modifier.modifier.ARMORModifier` and their summary.

Plain data (no torch tensors), so results can be gathered across ranks with
``all_gather_object`` and read by scripts and tests after ``oneshot``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from armor_modifier.core import ARMORFactors

__all__ = ["ARMORModuleResult", "summarize"]


@dataclass(frozen=True)
class ARMORModuleResult:
    """What ARMOR did to one Linear.

    :ivar name: module name, e.g. ``model.layers.0.mlp.up_proj``
    :ivar shape: ``(m, n)`` = ``(out_features, in_features)``
    :ivar wrapper_block_size: the block size used: the largest multiple of 4 ``<=`` the requested
        one that divides ``m`` and ``n``, or, with none requested, the largest whose overhead
        stays within ``max_wrapper_overhead`` (4 when even that exceeds it)
    :ivar requested_block_size: the block size asked for: the modifier's ``wrapper_block_size``,
        or the one its ``max_wrapper_overhead`` gave all its targets
    :ivar from_budget: ``requested_block_size`` came from ``max_wrapper_overhead``
    :ivar objective: ``"proxy"`` (the paper's diagonal loss) or ``"output"`` (the relative output
        error ``tr(E H E^T) / tr(W H W^T)``)
    :ivar init: the starting point: ``"nowag"`` (NoWag-P) or ``"sparsegpt"`` (SparseGPT 2:4)
    :ivar initial_loss: the objective's relative loss at the starting point (identity wrappers)
    :ivar final_loss: the objective's relative loss of the returned iterate; ``<= initial_loss``
    :ivar iterations: BCD iterations run (may stop early on ``patience``)
    :ivar best_iteration: the iteration whose iterate was kept
    :ivar num_tokens: calibration tokens behind ``h`` (all ranks)
    :ivar num_fallbacks: singular systems that kept their old value
    :ivar num_sanitized_h: entries of ``h`` that were non-finite or non-positive
    :ivar num_damping_increases: times the Hessian damping was raised to factorise it
    :ivar num_h_failures: 1 if the Hessian stayed singular (the result is then NoWag-P's)
    :ivar seconds: solver wall time
    :ivar rank: the rank that solved it (0 when not distributed)
    :ivar matmul_precision: the inputs of the descent's products with ``H`` (``"float32"`` or
        ``"bfloat16"``: what ``matmul_precision`` resolved to on the solving device)
    """

    name: str
    shape: tuple[int, int]
    wrapper_block_size: int
    requested_block_size: int
    objective: str
    init: str
    initial_loss: float
    final_loss: float
    iterations: int
    best_iteration: int
    num_tokens: int
    num_fallbacks: int
    num_sanitized_h: int
    num_damping_increases: int
    num_h_failures: int
    seconds: float
    rank: int = 0
    from_budget: bool = False
    matmul_precision: str = "float32"

    @classmethod
    def from_factors(
        cls,
        name: str,
        factors: ARMORFactors,
        requested_block_size: int,
        num_tokens: int,
        rank: int = 0,
        from_budget: bool = False,
    ) -> ARMORModuleResult:
        m, n = factors.core.shape
        return cls(
            name=name,
            shape=(int(m), int(n)),
            wrapper_block_size=factors.wrapper_block_size,
            requested_block_size=requested_block_size,
            objective=factors.objective,
            init=factors.init,
            initial_loss=factors.initial_loss,
            final_loss=factors.final_loss,
            iterations=len(factors.loss_history) - 1,
            best_iteration=factors.best_iteration,
            num_tokens=num_tokens,
            num_fallbacks=factors.num_fallbacks,
            num_sanitized_h=factors.num_sanitized_h,
            num_damping_increases=factors.num_damping_increases,
            num_h_failures=factors.num_h_failures,
            seconds=factors.seconds,
            rank=rank,
            from_budget=from_budget,
            matmul_precision=factors.matmul_precision,
        )

    @property
    def loss_ratio(self) -> float:
        """``final_loss / initial_loss`` (1.0 when the start is already exact)."""
        return self.final_loss / self.initial_loss if self.initial_loss > 0 else 1.0

    def log_line(self) -> str:
        m, n = self.shape
        block = f"b={self.wrapper_block_size}"
        asked = "max_wrapper_overhead gave" if self.from_budget else "requested"
        if self.wrapper_block_size != self.requested_block_size:
            block += f" ({asked} {self.requested_block_size}, which does not divide {m}x{n})"
        elif self.from_budget:
            block += " (from max_wrapper_overhead)"
        start = "NoWag-P" if self.init == "nowag" else "SparseGPT"
        failed = " (singular Hessian: NoWag-P kept)" if self.num_h_failures else ""
        if self.matmul_precision != "float32":
            failed += f", {self.matmul_precision} products"
        return (
            f"ARMOR {self.name} {m}x{n} {block}: {self.objective} loss {start} "
            f"{self.initial_loss:.5f} -> ARMOR {self.final_loss:.5f} ({self.loss_ratio:.1%}), "
            f"{self.iterations} iterations (best {self.best_iteration}), {self.seconds:.1f} s"
            f"{failed}"
        )


def summarize(results: Iterable[ARMORModuleResult], reconstructions: Iterable[Any] = ()) -> str:
    """One line: modules, mean loss ratio, wrapper overhead ``sum (m+n) b / sum m n``, fallbacks,
    sanitised ``h`` entries, Hessian troubles, solver time and, with ``reconstructions``
    (``LayerReconstruction`` s), their total time and its ratio to the solver's."""
    results = list(results)
    if not results:
        return "ARMOR summary: no module compressed"
    extra = sum((r.shape[0] + r.shape[1]) * r.wrapper_block_size for r in results)
    dense = sum(r.shape[0] * r.shape[1] for r in results)
    mean_ratio = sum(r.loss_ratio for r in results) / len(results)
    hessian = ""
    if any(r.objective == "output" or r.init == "sparsegpt" for r in results):
        hessian = (
            f"{sum(r.num_damping_increases for r in results)} Hessian damping increases, "
            f"{sum(r.num_h_failures for r in results)} singular Hessians, "
        )
    solving = sum(r.seconds for r in results)
    fitting = ""
    reconstruction_seconds = sum(r.result.seconds for r in reconstructions)
    if reconstruction_seconds:
        fitting = (f", {reconstruction_seconds:.1f} s reconstruction "
                   f"({reconstruction_seconds / max(solving, 1e-9):.2f}x the solve)")  # fmt: skip
    return (
        f"ARMOR summary: {len(results)} modules, mean loss ARMOR/start {mean_ratio:.3f} "
        f"(worst {max(r.loss_ratio for r in results):.3f}), wrapper overhead "
        f"{extra / dense:.2%} of the pruned weights, {sum(r.num_fallbacks for r in results)} "
        f"numerical fallbacks, {sum(r.num_sanitized_h for r in results)} sanitized h entries, "
        f"{hessian}{solving:.1f} s solving{fitting}"
    )
