"""Before calibration: will the statistics ARMOR keeps at once, plus one solve, fit in memory?

The statistics (:mod:`.stats`) are float64: ``8 n`` bytes per Linear of input width ``n``, plus
``8 n^2`` for ``X^T X`` when the settings need the layer Hessian. With ``calibration="sequential"``
one decoder layer's targets hold theirs at once (freed when the layer is compressed); with
``"dense"`` every target's are held until the end. Solving one ``[m, n]`` Linear needs about
:data:`SOLVE_MN_VALUES` ``m n`` plus :data:`SOLVE_NN_VALUES` ``n^2`` float32 values and
:data:`SOLVE_FIXED_BYTES` besides. The decoder-layer work (reconstruction, on by default;
propagation) adds, per decoder layer, its captured hidden-state inputs and dense outputs for every
calibration window (:func:`capture_bytes`). Under llm-compressor's basic pipeline
(``oneshot(pipeline="basic")``), which calibrates every layer before any is compressed, every
target's statistics and every decoder layer's captures are held together, and the check counts
them so (:func:`basic_pipeline_running`). The check compares the largest need with the memory
available on the targets' execution device and raises
:class:`~armor_modifier.core.errors.ARMORMemoryError` before any work when it does not fit. Not
counted: the model and the pipeline's cached activations.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.offload import get_execution_device
from torch import nn

from armor_modifier.core import SolverSettings
from armor_modifier.core.errors import ARMORMemoryError

from .collectives import rank_and_world
from .pipeline_frames import BASIC_PIPELINE, pipeline_frames

__all__ = [
    "MemoryNeed",
    "available_bytes",
    "basic_pipeline_running",
    "capture_bytes",
    "check_memory",
    "decoder_layer_name",
    "memory_needs",
]

#: float32 values one solve holds per weight entry and per ``H`` entry: an upper estimate of the
#: peak resident memory of ``factorize`` (``benchmarks/solve_memory.py`` prints both side by side;
#: the ratio it gives is in docs/results.md, "Solve memory")
SOLVE_MN_VALUES, SOLVE_NN_VALUES = 34, 3
#: bytes one solve holds whatever its shape (the first use of the math libraries' workspaces)
SOLVE_FIXED_BYTES = 256 * 2**20
_LAYER = re.compile(r"^(.*?\.\d+)\.")
#: the unit that holds every target's statistics at once
EVERY_TARGET = "every target"
GIB = 2**30


@dataclass(frozen=True)
class MemoryNeed:
    """What one unit of work holds at once, in bytes.

    :ivar unit: the decoder layer (``"model.layers.3"``) or ``"every target"`` (dense calibration,
        or every layer at once)
    :ivar linears: number of target Linears whose statistics the unit holds
    :ivar statistics: bytes of their statistics
    :ivar largest: name of the Linear with the costliest solve in the unit
    :ivar shape: its weight shape ``(m, n)``
    :ivar solve: bytes of that solve
    :ivar captures: bytes of the captured activations the unit holds (decoder-layer work)
    """

    unit: str
    linears: int
    statistics: int
    largest: str
    shape: tuple[int, int]
    solve: int
    captures: int = 0

    @property
    def total(self) -> int:
        return self.statistics + self.solve + self.captures


def decoder_layer_name(name: str) -> str | None:
    """The decoder layer a module name lies in, by its first numbered component
    (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``), or ``None`` (``lm_head``)."""
    match = _LAYER.match(name)
    return match.group(1) if match else None


def statistics_bytes(n: int, with_gram: bool) -> int:
    """Bytes of one Linear's :class:`~.stats.InputStatistics` (sums, count, optional gram)."""
    return 8 * n + 8 + (8 * n * n if with_gram else 0)


def solve_bytes(m: int, n: int, with_hessian: bool) -> int:
    """Estimated bytes one ``[m, n]`` solve holds (see :data:`SOLVE_MN_VALUES`)."""
    values = SOLVE_MN_VALUES * m * n + (SOLVE_NN_VALUES * n * n if with_hessian else 0)
    return SOLVE_FIXED_BYTES + 4 * values


def capture_bytes(model: nn.Module, calib: Any) -> int:
    """Bytes the decoder-layer work captures for one layer: its hidden-state inputs and dense
    outputs for every calibration window, ``2 * tokens * hidden * element size``.

    :param model: the model (``config.hidden_size``; its first floating parameter's dtype).
    :param calib: llm-compressor's calibration dataloader (``calib.dataset["input_ids"]``: this
        rank's windows; under torchrun every rank gathers all ranks' for the fit).
    :return: the bytes, or 0 where the windows or the hidden width are unknown
    """
    try:
        tokens = sum(len(ids) for ids in calib.dataset["input_ids"]) * rank_and_world()[1]
    except (AttributeError, KeyError, TypeError):
        return 0
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    floats = (p for p in model.parameters() if p.is_floating_point())
    first = next(floats, None)
    if not isinstance(hidden, int) or first is None:
        return 0
    return 2 * tokens * hidden * first.element_size()


def memory_needs(
    shapes: Mapping[str, tuple[int, int]],
    with_hessian: bool,
    calibration: str,
    captures: int = 0,
    at_once: bool = False,
) -> list[MemoryNeed]:
    """One :class:`MemoryNeed` per unit of work, in first-seen order.

    :param shapes: target name -> weight shape ``(m, n)``
    :param with_hessian: whether ``X^T X`` is collected (``SolverSettings.needs_hessian``)
    :param calibration: ``"sequential"`` (a unit per decoder layer, the first numbered component
        of the name; a name without one is its own unit) or ``"dense"`` (one unit)
    :param captures: :func:`capture_bytes` of one decoder layer (sequential only)
    :param at_once: every layer is calibrated before any is compressed (the basic pipeline): one
        unit holding every target's statistics and every decoder layer's captures
    """
    one_unit = calibration == "dense" or at_once
    units: dict[str, list[str]] = {}
    for name in shapes:
        unit = EVERY_TARGET if one_unit else decoder_layer_name(name) or name
        units.setdefault(unit, []).append(name)
    needs = []
    for unit, names in units.items():
        largest = max(names, key=lambda name: solve_bytes(*shapes[name], with_hessian))
        stats = sum(statistics_bytes(shapes[name][1], with_hessian) for name in names)
        layers = {decoder_layer_name(name) for name in names} - {None}
        held = captures * len(layers) if calibration == "sequential" else 0
        needs.append(MemoryNeed(unit, len(names), stats, largest, shapes[largest],
                                solve_bytes(*shapes[largest], with_hessian), held))  # fmt: skip
    return needs


def basic_pipeline_running() -> bool:
    """Whether llm-compressor's basic pipeline is calibrating (its ``__call__`` is on the stack):
    it runs every calibration batch through the whole model, then compresses every layer."""
    return next(pipeline_frames(BASIC_PIPELINE), None) is not None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free bytes, Linux's ``MemAvailable`` for the CPU, else
    ``None`` (unknown: no check)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(
    names: Mapping[nn.Linear, str],
    settings: SolverSettings,
    calibration: str,
    available: Callable[[torch.device], int | None] | None = None,
    captures: int = 0,
    at_once: bool | None = None,
) -> None:
    """Raise :class:`ARMORMemoryError` before any work if the largest need exceeds what
    ``available`` (default :func:`available_bytes`) reports for the first target's execution
    device; ``captures``: :func:`capture_bytes` when decoder-layer work runs, else 0;
    ``at_once``: every layer calibrated before any is compressed (``None``:
    :func:`basic_pipeline_running`)."""
    if not names:
        return
    device = get_execution_device(next(iter(names)))
    free = (available or available_bytes)(device)
    shapes = {name: (module.out_features, module.in_features) for module, name in names.items()}
    at_once = basic_pipeline_running() if at_once is None else at_once
    needs = memory_needs(shapes, settings.needs_hessian, calibration, captures, at_once)
    worst = max(needs, key=lambda need: need.total)
    if free is None or worst.total <= free:
        return
    kind = "float64 sums and X^T X" if settings.needs_hessian else "float64 sums"
    m, n = worst.shape
    if calibration == "dense":
        fix = (
            "use calibration='sequential' (one decoder layer's statistics at a time), free memory "
            "or use a device with more"
        )
    elif at_once:
        fix = (
            "oneshot's pipeline='basic' calibrates every layer before compressing any; use "
            "pipeline='sequential' (or the default 'independent'), which holds one decoder "
            "layer's at a time"
        )
    else:
        fix = (
            "free memory or use a device with more; objective='proxy' with init='nowag' keeps no "
            "n x n statistics"
        )
    held = (
        f", and reconstruction's captured activations ({worst.captures / GIB:.2f} GiB; fewer "
        "calibration windows or reconstruction_steps=0 hold less)"
        if worst.captures else ""
    )
    raise ARMORMemoryError(
        f"ARMOR needs about {worst.total / GIB:.2f} GiB on {device} for {worst.unit}: the "
        f"calibration statistics of {worst.linears} Linears ({kind}, {worst.statistics / GIB:.2f} "
        f"GiB) and solving the largest, {worst.largest} {m}x{n} (about {worst.solve / GIB:.2f} "
        f"GiB){held}, but {free / GIB:.2f} GiB is available; {fix}"
    )
