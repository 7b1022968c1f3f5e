"""The knobs of model-level distillation (docs/algorithm.md, "Model-level distillation").

Distillation runs after ``oneshot`` on the whole pruned model, so its settings are not
``ARMORModifier`` fields: ``armor_modifier.prune(distillation=...)`` and the ``armor prune
--distill-*`` options take them. Each field's ``help`` metadata is its one-line description (the
CLI's ``--help`` and ``docs/settings.md``); measured effects: ``docs/results.md#zeroshot_levers``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .errors import ARMORValueError
from .reconstruct import PARAMETER_SETS, PRECISIONS, check_fit_fields, min_fit_windows

__all__ = [
    "DISTILLATION_OPTIONS",
    "DISTILL_PARAMETER_SETS",
    "QUANTIZED_PARAMETER_SETS",
    "DistillationSettings",
    "distillation_table",
]

#: What a distillation may move on quantized cores (the codes never move).
QUANTIZED_PARAMETER_SETS = ("wrappers", "wrappers+scales")
#: What a distillation may move: the fit's sets and the scales of quantized cores.
DISTILL_PARAMETER_SETS = (*PARAMETER_SETS, "wrappers+scales")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class DistillationSettings:
    """Every knob of the model-level fit to the dense model's next-token distributions, checked
    on creation. The defaults are the run of ``docs/results.md#zeroshot_levers`` (row
    ``armor-kl``) but for ``steps``, which is 0 (off)."""

    steps: int = field(default=0, metadata=_help(
        "Adam steps fitting every ARMOR Linear's wrappers and kept core values at once to the "
        "dense model's next-token distributions, after pruning (0: off)"))
    num_samples: int = field(default=64, metadata=_help(
        "calibration windows of the fit (drawn like the pruning's, same seed and text; the "
        "dense model runs once over them before pruning)"))
    learning_rate: float = field(default=1e-5, metadata=_help("Adam learning rate"))
    windows_per_step: int = field(default=2, metadata=_help("windows per Adam step"))
    parameters: Literal["all", "wrappers", "core", "wrappers+scales"] = field(
        default="all", metadata=_help(
            "what moves: 'all' (A, B and the kept core values), 'wrappers' or 'core'; on "
            "quantized cores 'wrappers' or 'wrappers+scales' (the quantization scales too, "
            "integer codes fixed); masks never move, so every core stays exactly 2:4"))
    guard_fraction: float = field(default=0.125, metadata=_help(
        "share of the windows held out; the best held-out iterate is kept only when it beats "
        "the pruned model"))
    eval_every: int = field(default=14, metadata=_help("steps between held-out evaluations"))
    patience: int = field(default=0, metadata=_help(
        "held-out evaluations in a row without a new best after which the fit stops (0: never)"))
    precision: Literal["float32", "bfloat16"] = field(default="bfloat16", metadata=_help(
        "autocast dtype of the fit's forward and backward; the KL, the dense distributions and "
        "the held-out check stay float32"))
    seed: int = field(default=0, metadata=_help("seed of the order the fit windows are visited"))

    def __post_init__(self) -> None:
        check_fit_fields(
            self, "distill_",
            {"steps": 0, "num_samples": 1, "windows_per_step": 1, "eval_every": 1, "patience": 0,
             "seed": 0},
            {"parameters": DISTILL_PARAMETER_SETS, "precision": PRECISIONS},
        )  # fmt: skip
        if self.steps > 0 and self.num_samples < self.min_windows():
            raise ARMORValueError(
                f"distill_num_samples {self.num_samples} leaves no fit or no held-out window at "
                f"guard fraction {self.guard_fraction}; use at least {self.min_windows()}"
            )

    def check_quantization(self, quantized: str | None) -> None:
        """Refuse parameters that would move quantized cores off their grid, or scales where
        nothing is quantized.

        :param quantized: which cores are quantized, in words (``None``: none)
        :raises ARMORValueError: naming the option and the choices that work
        """
        if quantized is not None and self.parameters not in QUANTIZED_PARAMETER_SETS:
            raise ARMORValueError(
                f"distill_parameters={self.parameters!r} (--distill-parameters) would move "
                f"{quantized} off the grid they are quantized to; use 'wrappers' (codes and "
                "scales stay) or 'wrappers+scales' (codes stay)"
            )
        if quantized is None and self.parameters == "wrappers+scales":
            raise ARMORValueError(
                "distill_parameters='wrappers+scales' (--distill-parameters) moves quantization "
                "scales, and nothing quantizes the cores; use 'all', 'wrappers' or 'core', or "
                "quantize them"
            )

    def min_windows(self) -> int:
        """The fewest windows that leave at least one guard and one fit window."""
        return min_fit_windows(self.guard_fraction)


#: ``armor prune`` option (without ``--``, underscores) -> :class:`DistillationSettings` field
#: (``seed`` comes from ``--seed``)
DISTILLATION_OPTIONS: dict[str, str] = {
    f"distill_{f.name}": f.name
    for f in dataclasses.fields(DistillationSettings)
    if f.name != "seed"
}


def distillation_table() -> str:
    """Markdown: one row per distillation option (option, default, what it does)."""
    lines = ["| option | default | what it does |", "|---|---|---|"]
    by_name = {f.name: f for f in dataclasses.fields(DistillationSettings)}
    for option, name in DISTILLATION_OPTIONS.items():
        f = by_name[name]
        flag = "--" + option.replace("_", "-")
        lines.append(f"| `{flag}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(lines)
