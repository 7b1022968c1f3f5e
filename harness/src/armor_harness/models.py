"""The benchmark models by name: ``armor prune NAME``, ``armor eval NAME`` and the benchmarks'
``--model NAME`` load them through :func:`load_benchmark_model`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from armor_modifier.calibration import BENCHMARK_MODELS, LoadedModel
from armor_modifier.core.errors import ARMORValueError

from .qwen import NAME as QWEN
from .qwen import load_qwen_model
from .smollm2 import load_default_model

LOADERS: dict[str, Callable[..., LoadedModel]] = {
    "smollm2": load_default_model,
    QWEN: load_qwen_model,
}
assert tuple(LOADERS) == BENCHMARK_MODELS, "the library's list of harness models is out of date"


def load_benchmark_model(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The benchmark model ``name`` (one of ``BENCHMARK_MODELS``), cached once as a plain
    checkpoint; see :mod:`.smollm2` and :mod:`.qwen`."""
    if name not in LOADERS:
        raise ARMORValueError(f"unknown benchmark model {name!r}; one of {sorted(LOADERS)}")
    return LOADERS[name](dtype=dtype)
