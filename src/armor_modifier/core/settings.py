"""Every knob of the ARMOR solver in one frozen object, with the one set of defaults and checks.

:func:`~armor_modifier.core.factorize` takes a :class:`SolverSettings`; ``ARMORModifier``'s fields,
the ``armor prune`` options and ``docs/settings.md`` are built from it (:mod:`.options`), and an
armor-ct checkpoint records :meth:`SolverSettings.to_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ARMORTypeError, ARMORValueError
from .precision import MATMUL_PRECISIONS
from .problem import check_wrapper_block_size, choose_wrapper_block_size, wrapper_overhead
from .scoring import DAMPING_KINDS

__all__ = [
    "DAMPING_KINDS",
    "FIELD_HELP",
    "INITS",
    "MATMUL_PRECISIONS",
    "MODES",
    "OBJECTIVES",
    "SolverSettings",
    "derived_seed",
]

MODES = ("exact", "adam")
OBJECTIVES = ("proxy", "output")
INITS = ("nowag", "sparsegpt")

#: One line per field: what it does (the CLI's ``--help`` and the modifier's docstring use it).
FIELD_HELP: dict[str, str] = {
    "max_wrapper_overhead": "wrapper parameters allowed, as a fraction of the pruned weights (at "
    "most 1): the largest block size b whose wrappers stay within it, over all Linears an "
    "ARMORModifier prunes together (over the one weight for factorize); each Linear gets the "
    "largest multiple of 4 <= b dividing it (b = 4 when even that exceeds the budget)",
    "wrapper_block_size": "wrapper block size b (a multiple of 4); wins over "
    "max_wrapper_overhead when given (the largest multiple of 4 <= b dividing both dimensions)",
    "num_iterations": "block-coordinate-descent iterations per Linear (0: the start alone)",
    "update_mode": "'exact' (closed-form A, B and CG on the core; monotone) or 'adam' (the "
    "paper's joint Adam step; needs far more iterations)",
    "learning_rate": "Adam learning rate (update_mode='adam')",
    "cg_steps": "conjugate-gradient steps on the core per iteration (update_mode='exact')",
    "update_mask": "run the discrete 2:4 step (False keeps the starting mask)",
    "groups_per_tile": "objective='proxy': 4-groups re-optimised per b x b tile per discrete step",
    "patience": "stop after this many iterations without relative improvement of 1e-6",
    "seed": "base seed of the group sampling (each Linear adds crc32 of its name)",
    "objective": "'output' (the layer's output error with the full Hessian, from SparseGPT) or "
    "'proxy' (the paper's diag(h)-weighted loss, from NoWag-P)",
    "init": "start: 'sparsegpt' or 'nowag'; default by objective (output: sparsegpt, proxy: nowag)",
    "dampening_frac": "SparseGPT's damping of H, a fraction of mean(diag H)",
    "output_damping": "objective='output': ridge output_damping * mean(diag H) added to H "
    "(pulls the result towards W; 0 = exact calibration error)",
    "output_damping_kind": "'identity' (the ridge above) or 'diagonal' (output_damping * diag(H))",
    "matmul_precision": "objective='output': 'float32' or 'bfloat16' inputs for the n x n "
    "products of the conjugate-gradient steps with H, or 'auto': bfloat16 where the device "
    "multiplies it natively (CUDA; CPUs with AVX-512 BF16 or AMX), float32 elsewhere (emulated "
    "bfloat16 is slower); the returned loss is rechecked in float32",
}


def derived_seed(base: int, name: str, bits: int) -> int:
    """The seed of one module: ``(base + crc32(name)) mod 2**bits`` (the solver uses 63 bits per
    Linear, decoder-layer reconstruction 31 bits per layer; both kept as first chosen, so
    results stay the same)."""
    return (base + zlib.crc32(name.encode())) % 2**bits


def _number(name: str, value: object, *, low: float, low_open: bool, rule: str) -> None:
    ok = False
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        ok = value > low if low_open else value >= low
    if not ok:
        raise ARMORValueError(f"{name} must be {rule}, got {value!r}")


def _integer(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ARMORValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ARMORValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class SolverSettings:
    """The ARMOR solver's settings (see :data:`FIELD_HELP` for each field; checked on creation).

    ``wrapper_block_size=None`` follows ``max_wrapper_overhead`` (over all targets of an
    ``ARMORModifier``, over the one weight for ``factorize``). How the defaults were chosen and
    what they measure: ``docs/settings.md`` and the benchmark documents it points to.
    """

    max_wrapper_overhead: float = 0.10
    wrapper_block_size: int | None = None
    num_iterations: int = 20
    update_mode: Literal["exact", "adam"] = "exact"
    learning_rate: float = 1e-4
    cg_steps: int = 2
    update_mask: bool = True
    groups_per_tile: int = 64
    patience: int = 100
    seed: int = 0
    objective: Literal["proxy", "output"] = "output"
    init: Literal["nowag", "sparsegpt"] | None = None
    dampening_frac: float = 0.01
    output_damping: float = 0.1
    output_damping_kind: Literal["identity", "diagonal"] = "identity"
    matmul_precision: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        _number(
            "max_wrapper_overhead", self.max_wrapper_overhead, low=0.0, low_open=True,
            rule="a number > 0 (a fraction: 0.1 allows wrappers of 10 % of each weight)",
        )  # fmt: skip
        if self.max_wrapper_overhead > 1:
            raise ARMORValueError(
                "max_wrapper_overhead is a fraction of each weight and at most 1 (0.1 allows "
                f"wrappers of 10 %), got {self.max_wrapper_overhead!r}"
            )
        if self.wrapper_block_size is not None:
            check_wrapper_block_size(self.wrapper_block_size)
        _integer("num_iterations", self.num_iterations, 0)
        _choice("update_mode", self.update_mode, MODES)
        _number("learning_rate", self.learning_rate, low=0.0, low_open=True, rule="> 0")
        _integer("cg_steps", self.cg_steps, 1)
        if not isinstance(self.update_mask, bool):
            raise ARMORValueError(f"update_mask must be True or False, got {self.update_mask!r}")
        _integer("groups_per_tile", self.groups_per_tile, 1)
        _integer("patience", self.patience, 1)
        _integer("seed", self.seed, 0)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        if self.init is not None:
            _choice("init", self.init, INITS)
        _number(
            "dampening_frac", self.dampening_frac, low=0.0, low_open=True,
            rule="a number > 0 (SparseGPT uses 0.01)",
        )  # fmt: skip
        _number("output_damping", self.output_damping, low=0.0, low_open=False,
                rule="a number >= 0 (try 0.1)")  # fmt: skip
        _choice("output_damping_kind", self.output_damping_kind, DAMPING_KINDS)

    @property
    def start(self) -> str:
        """``init``, or its default for the objective."""
        if self.init is not None:
            return self.init
        return "sparsegpt" if self.objective == "output" else "nowag"

    @property
    def needs_hessian(self) -> bool:
        """Whether the layer Hessian ``H = X^T X / N`` (``[n, n]``) must be collected."""
        return self.objective == "output" or self.start == "sparsegpt"

    def block_size_for(self, m: int, n: int) -> int:
        """The wrapper block size ``b`` a ``[m, n]`` weight gets under these settings (alone:
        the budget applies to this one weight)."""
        return choose_wrapper_block_size(
            m, n, self.wrapper_block_size, max_overhead=self.max_wrapper_overhead
        )

    def overhead_for(self, m: int, n: int) -> float:
        """The wrapper overhead ``(m + n) b / (m n)`` a ``[m, n]`` weight gets."""
        return wrapper_overhead(m, n, self.block_size_for(m, n))

    def replace(self, **changes: Any) -> SolverSettings:
        """A copy with ``changes`` applied (checked again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ARMORTypeError(
                f"unknown solver setting(s) {unknown}; known: "
                f"{[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (recorded in armor-ct's ``armor.recipe``)."""
        return dataclasses.asdict(self)
