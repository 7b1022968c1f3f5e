"""Decoder-layer reconstruction (docs/algorithm.md, "Decoder-layer reconstruction"): a layer's
ARMOR parameters fitted jointly.

After every Linear of a layer is factorised alone, the layer's output still carries the errors the
Linears cannot see from their own inputs (the softmax, the SiLU gate, the next Linear's real
inputs). :func:`reconstruct_layer` lowers the layer's relative output error

    R(θ) = Σ_i ||f_θ(X_i) − T_i||² / Σ_i ||T_i − X_i||²

by Adam steps on ``θ`` (the wrappers ``A``, ``B`` and the kept values of the 2:4 cores ``S``; the
masks ``M`` are frozen: a parameter's gradient and value are multiplied by its mask, so every core
stays exactly 2:4). ``T_i`` is the dense layer's output (or the dense model's hidden state), ``X_i``
the layer's input: the denominator is the size of what the layer adds to its residual stream.

Guarantee: windows are split into *fit* windows (the gradient) and *guard* windows (never fitted).
The iterate with the lowest guard error is kept, and the starting point wins unless that iterate's
guard error is strictly lower. A non-finite loss, gradient step or guard error stops the run and
restores the starting parameters; that is counted as a rollback.

Pure torch: the caller passes ``run(i)``, the layer's output for window ``i`` computed from the
current parameter tensors, so no model framework is imported here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from .errors import ARMORValueError
from .precision import resolve_matmul_precision

__all__ = [
    "DEFAULT_STEPS",
    "PARAMETER_SETS",
    "PRECISIONS",
    "RECONSTRUCTION_FIELDS",
    "RECONSTRUCTION_PRECISIONS",
    "TARGETS",
    "UNITS",
    "FitSettings",
    "ReconstructionResult",
    "ReconstructionSettings",
    "check_fit_fields",
    "fit_guarded",
    "guard_split",
    "min_fit_windows",
    "reconstruct_layer",
]

#: Which parameters move: every wrapper and core, the wrappers only, or the cores only.
PARAMETER_SETS = ("all", "wrappers", "core")
#: What the layer's output is fitted to.
TARGETS = ("layer", "model")
#: What is fitted as one unit: the whole decoder layer, or each of its blocks in turn.
UNITS = ("layer", "block")
#: Autocast dtypes of a guarded fit's forward and backward.
PRECISIONS = ("float32", "bfloat16")
#: ``reconstruction_precision`` values: ``"auto"`` takes bfloat16 where the layer's device
#: multiplies it natively (:func:`~armor_modifier.core.precision.native_bfloat16`).
RECONSTRUCTION_PRECISIONS = ("auto", *PRECISIONS)
#: Adam steps per decoder layer when ``steps`` is left unset (``None``) and the run allows them
#: (chosen on valid: docs/results.md#reconstruction_defaults)
DEFAULT_STEPS = 20


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ReconstructionSettings:
    """Every knob of the decoder-layer work, checked on creation; each field's ``help`` metadata
    is its one-line description (the modifier's field description and the CLI's ``--help``).

    The modifier's field for ``x`` is ``reconstruction_x`` (:data:`RECONSTRUCTION_FIELDS`), except
    ``propagate_within_layer``; ``seed`` is the modifier's ``seed``. Measured effects:
    ``docs/results.md#reconstruction``.
    """

    propagate_within_layer: bool = field(default=False, metadata=_help(
        "compress each decoder layer's Linears in call order, groups sharing one input (q/k/v, "
        "o, gate/up, down), re-collecting each later group's statistics through the already "
        "compressed ones"))
    steps: int | None = field(default=None, metadata=_help(
        "Adam steps fitting each decoder layer's ARMOR parameters jointly to the layer's output; "
        "None (default): 20 where the run allows it (sequential calibration, enough windows for "
        "a guard window: 8 at the default fraction, every target inside a decoder layer the "
        "hooks can replay), else 0 with a warning; a number given that cannot run is an error; "
        "0: off, the per-Linear result bit for bit"))
    learning_rate: float = field(default=1e-4, metadata=_help("Adam learning rate"))
    windows_per_step: int = field(default=2, metadata=_help(
        "calibration windows (batches) per Adam step (cost per step; 2 chosen on valid: "
        "docs/results.md#reconstruction_defaults)"))
    parameters: Literal["all", "wrappers", "core"] = field(default="all", metadata=_help(
        "what moves: 'all' (A, B and the kept core values), 'wrappers' or 'core'; masks never "
        "move, so every core stays exactly 2:4"))
    guard_fraction: float = field(default=0.125, metadata=_help(
        "share of the calibration windows held out; the best held-out iterate is kept only "
        "when it beats the unrefined layer"))
    eval_every: int = field(default=20, metadata=_help("steps between held-out evaluations"))
    patience: int = field(default=0, metadata=_help(
        "held-out evaluations in a row without a new best after which the fit stops early (0: "
        "never)"))
    target: Literal["layer", "model"] = field(default="layer", metadata=_help(
        "'layer' (the dense layer on the same, already compressed inputs) or 'model' (the dense "
        "model's hidden state, which also corrects upstream drift)"))
    unit: Literal["layer", "block"] = field(default="layer", metadata=_help(
        "'layer' (all the layer's ARMOR Linears fitted at once to its output) or 'block' (each "
        "child block holding targets, e.g. attention then MLP, fitted alone in call order: "
        "every block but the last to the dense block's output, the last to the layer's)"))
    precision: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata=_help(
        "autocast dtype of the fit steps' forward and backward ('bfloat16': faster where "
        "bfloat16 matrix units exist, AMX or AVX-512 BF16 CPUs and GPUs; 'auto': bfloat16 "
        "there, float32 elsewhere); parameters, loss and guard stay float32"))
    seed: int = field(default=0, metadata=_help(
        "seed of the order in which fit windows are visited (each layer adds crc32 of its name)"))

    def __post_init__(self) -> None:
        if not isinstance(self.propagate_within_layer, bool):
            raise ARMORValueError(
                f"propagate_within_layer must be True or False, got {self.propagate_within_layer!r}"
            )
        check_fit_fields(
            self, "reconstruction_",
            {**({} if self.steps is None else {"steps": 0}),
             "windows_per_step": 1, "eval_every": 1, "patience": 0, "seed": 0},
            {"parameters": PARAMETER_SETS, "target": TARGETS, "unit": UNITS,
             "precision": RECONSTRUCTION_PRECISIONS},
        )  # fmt: skip

    @property
    def fit_steps(self) -> int:
        """``steps``, with ``None`` (unset) read as :data:`DEFAULT_STEPS`."""
        return DEFAULT_STEPS if self.steps is None else self.steps

    @property
    def works_per_layer(self) -> bool:
        """Whether anything runs per decoder layer (propagation or reconstruction)."""
        return self.propagate_within_layer or self.fit_steps > 0

    @property
    def asks_for_layer_work(self) -> bool:
        """Whether propagation or reconstruction was asked for by a value given (an unset
        ``steps`` may fall back to 0 where the run cannot replay decoder layers)."""
        return self.propagate_within_layer or bool(self.steps)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], seed: int = 0) -> ReconstructionSettings:
        """From ``ARMORModifier``-style names (:data:`RECONSTRUCTION_FIELDS`); names absent from
        ``fields`` keep their defaults, other names are ignored."""
        return cls(
            seed=seed,
            **{
                name: fields[option]
                for option, name in RECONSTRUCTION_FIELDS.items()
                if option in fields
            },
        )

    def to_fields(self) -> dict[str, Any]:
        """The ``ARMORModifier``-style names and values (recorded in armor-ct's recipe)."""
        return {option: getattr(self, name) for option, name in RECONSTRUCTION_FIELDS.items()}

    def min_windows(self) -> int:
        """The fewest calibration windows that leave at least one guard and one fit window."""
        return min_fit_windows(self.guard_fraction)


def min_fit_windows(guard_fraction: float) -> int:
    """The fewest windows that leave at least one guard and one fit window (:func:`guard_split`)."""
    return max(2, math.ceil(1 / guard_fraction - 1e-9))


def check_fit_fields(
    settings: Any, prefix: str, lower_bounds: Mapping[str, int], choices: Mapping[str, tuple]
) -> None:
    """The checks a guarded fit's settings share (reconstruction, distillation): integers at
    least their bound, a finite positive ``learning_rate``, ``guard_fraction`` in (0, 1), and
    values among their choices; each error names ``prefix`` + the field, the value and the rule.

    :raises ARMORValueError: on the first field that fails
    """
    for name, low in lower_bounds.items():
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ARMORValueError(f"{prefix}{name} must be an integer >= {low}, got {value!r}")
    lr = settings.learning_rate
    if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ARMORValueError(f"{prefix}learning_rate must be a finite number > 0, got {lr!r}")
    g = settings.guard_fraction
    if not isinstance(g, int | float) or not 0 < g < 1:
        raise ARMORValueError(f"{prefix}guard_fraction must be in (0, 1), got {g!r}")
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise ARMORValueError(
                f"{prefix}{name} must be one of {list(allowed)}, got {getattr(settings, name)!r}"
            )


#: ``ARMORModifier`` field -> :class:`ReconstructionSettings` field (all but ``seed``)
RECONSTRUCTION_FIELDS: dict[str, str] = {
    (f.name if f.name == "propagate_within_layer" else f"reconstruction_{f.name}"): f.name
    for f in dataclasses.fields(ReconstructionSettings)
    if f.name != "seed"
}


@dataclass(frozen=True)
class ReconstructionResult:
    """What :func:`reconstruct_layer` did to one layer.

    :ivar initial_error: guard-set ``R`` of the starting parameters
    :ivar final_error: guard-set ``R`` of the parameters returned (``<= initial_error``)
    :ivar best_step: the step whose iterate was kept (0: the start)
    :ivar steps_run: steps taken (fewer than asked when the loss became non-finite or the fit
        stopped early on ``patience``)
    :ivar accepted: the refined iterate replaced the start
    :ivar rolled_back: the loss became non-finite and the run was stopped
    :ivar history: ``(step, guard R)`` at every guard evaluation, step 0 first
    :ivar seconds: wall time
    :ivar precision: autocast dtype the fit steps ran in (``"float32"`` or ``"bfloat16"``: what
        ``precision`` resolved to on the layer's device)
    """

    initial_error: float
    final_error: float
    best_step: int
    steps_run: int
    accepted: bool
    rolled_back: bool
    history: tuple[tuple[int, float], ...]
    seconds: float
    precision: str = "float32"

    @property
    def gain(self) -> float:
        """Relative drop of the guard error, ``1 - final / initial`` (0 when not accepted)."""
        if self.initial_error <= 0:
            return 0.0
        return 1.0 - self.final_error / self.initial_error


def guard_split(num_windows: int, guard_fraction: float) -> tuple[list[int], list[int]]:
    """Evenly spaced guard windows: ``(fit, guard)`` index lists covering ``range(num_windows)``.

    :raises ARMORValueError: when no guard or no fit window would be left
    """
    num_guard = int(num_windows * guard_fraction + 1e-9)
    if num_guard < 1 or num_guard >= num_windows:
        need = max(2, math.ceil(1 / guard_fraction - 1e-9))
        raise ARMORValueError(
            f"reconstruction holds out {guard_fraction:g} of the calibration windows, which "
            f"leaves no guard or no fit window out of {num_windows}; pass at least {need} "
            "calibration samples or raise reconstruction_guard_fraction"
        )
    guard = sorted({int((j + 0.5) * num_windows / num_guard) for j in range(num_guard)})
    fit = [i for i in range(num_windows) if i not in set(guard)]
    return fit, guard


def reconstruct_layer(
    run: Callable[[int], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    settings: ReconstructionSettings,
    progress: Callable[[int, float], None] | None = None,
) -> ReconstructionResult:
    """Refine ``params`` in place by Adam on the fit windows; keep the best guard iterate.

    :param run: ``i -> f_θ(X_i)`` ``[..., d]``, differentiable in ``params``
    :param inputs: ``X_i`` ``[..., d]`` per window (the denominator of ``R``)
    :param targets: ``T_i`` ``[..., d]`` per window
    :param params: leaf float tensors (any shapes) that ``run`` reads; updated in place
    :param masks: per parameter, a 0/1 tensor of its shape (frozen zeros) or ``None``
    :param settings: steps, learning rate, windows per step, guard fraction, evaluation period
    :param progress: called as ``progress(step, loss)`` after every step
    :return: the guard errors before and after, the step kept and whether it was accepted
    """
    fit, guard = guard_split(len(inputs), settings.guard_fraction)
    scale = [
        float((t.double() - x.double()).pow(2).sum()) for x, t in zip(inputs, targets, strict=True)
    ]
    guard_scale = sum(scale[i] for i in guard) or 1.0
    precision = resolve_matmul_precision(settings.precision, targets[0].device)
    low_precision = precision == "bfloat16"

    def guard_error() -> float:
        with torch.no_grad():
            total = sum(float((run(i).double() - targets[i].double()).pow(2).sum()) for i in guard)
        return total / guard_scale

    def batch_backward(batch: list[int]) -> float:
        """The batch's summed loss, its gradient accumulated (one backward per window)."""
        denominator = sum(scale[i] for i in batch) or 1.0
        total = 0.0
        for i in batch:
            device = targets[i].device.type
            with torch.autocast(device, dtype=torch.bfloat16, enabled=low_precision):
                out = run(i)
            loss = (out.to(targets[i].dtype) - targets[i]).pow(2).sum() / denominator
            loss.backward()
            total += float(loss.detach())
        return total

    return fit_guarded(batch_backward, guard_error, fit, params, masks, settings, progress,
                       steps=settings.fit_steps, precision=precision)  # fmt: skip


class FitSettings(Protocol):
    """What :func:`fit_guarded` reads (``ReconstructionSettings``, ``DistillationSettings``)."""

    @property
    def learning_rate(self) -> float: ...
    @property
    def windows_per_step(self) -> int: ...
    @property
    def eval_every(self) -> int: ...
    @property
    def patience(self) -> int: ...
    @property
    def seed(self) -> int: ...


def fit_guarded(
    batch_backward: Callable[[list[int]], float],
    guard_error: Callable[[], float],
    fit: list[int],
    params: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    settings: FitSettings,
    progress: Callable[[int, float], None] | None = None,
    *,
    steps: int,
    precision: str,
) -> ReconstructionResult:
    """The guarded Adam fit behind :func:`reconstruct_layer` and model-level distillation.

    Refines ``params`` in place and keeps the iterate with the lowest ``guard_error()`` (the
    start unless one is strictly lower); masked entries stay zero; a non-finite loss, step or
    guard error restores the start.

    :param batch_backward: ``batch -> loss``: the loss of the fit windows ``batch`` (indices
        drawn from ``fit``), its gradient accumulated into ``params`` (``backward`` called)
    :param guard_error: the held-out error of the current ``params`` (no gradient)
    :param fit: the window indices the fit draws from (a seeded permutation per pass)
    :param params: leaf float tensors that both callables read; updated in place
    :param masks: per parameter, a 0/1 tensor of its shape (frozen zeros) or ``None``
    :param settings: learning rate, windows per step, evaluation period, patience, seed
    :param progress: called as ``progress(step, loss)`` after every step
    :param steps: Adam steps at most (0: the start is returned, its guard error measured)
    :param precision: the autocast dtype ``batch_backward`` runs in, recorded in the result
    """
    start = time.perf_counter()
    initial = [p.detach().clone() for p in params]
    best = initial
    best_error = initial_error = guard_error()
    best_step, steps_run, rolled_back, stale = 0, 0, False, 0
    history = [(0, initial_error)]
    if steps > 0 and math.isfinite(initial_error):
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
        order = _window_order(fit, settings)
        for step in range(1, steps + 1):
            batch = [next(order) for _ in range(min(settings.windows_per_step, len(fit)))]
            loss = _step(batch_backward, batch, optimizer, params, masks)
            steps_run = step
            if not math.isfinite(loss) or not all(bool(torch.isfinite(p).all()) for p in params):
                rolled_back = True
                break
            if progress is not None:
                progress(step, loss)
            if step % settings.eval_every == 0 or step == steps:
                error = guard_error()
                history.append((step, error))
                if not math.isfinite(error):
                    rolled_back = True
                    break
                stale = 0 if error < best_error else stale + 1  # evaluations since the best
                if error < best_error:
                    best_error, best_step = error, step
                    best = [p.detach().clone() for p in params]
                elif settings.patience and stale >= settings.patience:
                    break
        for p in params:
            p.requires_grad_(False)
    if rolled_back:
        best, best_error, best_step = initial, initial_error, 0
    with torch.no_grad():
        for p, value in zip(params, best, strict=True):
            p.copy_(value)
    return ReconstructionResult(
        initial_error=initial_error,
        final_error=best_error,
        best_step=best_step,
        steps_run=steps_run,
        accepted=best_step > 0,
        rolled_back=rolled_back,
        history=tuple(history),
        seconds=time.perf_counter() - start,
        precision=precision,
    )


def _step(
    batch_backward: Callable[[list[int]], float],
    batch: list[int],
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
) -> float:
    """One Adam step on ``batch``'s loss (masked gradients and values); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    total = batch_backward(batch)
    if not math.isfinite(total):
        return total
    for p, mask in zip(params, masks, strict=True):
        if mask is not None and p.grad is not None:
            p.grad.mul_(mask)
    optimizer.step()
    with torch.no_grad():
        for p, mask in zip(params, masks, strict=True):
            if mask is not None:
                p.mul_(mask)
    return total


def _window_order(fit: list[int], settings: FitSettings):
    """Endless stream of fit windows: a fresh seeded permutation per pass."""
    generator = torch.Generator().manual_seed(settings.seed)
    while True:
        for j in torch.randperm(len(fit), generator=generator).tolist():
            yield fit[j]
