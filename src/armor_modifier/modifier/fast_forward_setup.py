"""When a run keeps a frontier and skips loaded layers' passes (:mod:`.fast_forward`)."""

from __future__ import annotations

import time
from typing import Any

from llmcompressor.core import active_session
from loguru import logger
from torch import nn

from .fast_forward import FastForward, LayerProgress
from .pipeline_frames import SEQUENTIAL_PIPELINE, pipeline_frames

__all__ = ["fast_forward_blocked", "pipeline_propagates", "start_fast_forward"]


def fast_forward_blocked(model: nn.Module, names: list[str], others: int, world: int,
                         model_stream: bool, propagates: bool | None) -> str | None:  # fmt: skip
    """Why a run cannot skip loaded layers' passes (``None``: it can).

    :param names: the decoder layers holding targets (``model.layers.3``), model order
    :param others: how many other modifiers the recipe has
    :param model_stream: whether reconstruction fits against the dense model's stream
    :param propagates: :func:`pipeline_propagates`
    """
    if propagates is None:
        return "the sequential pipeline's propagate_error could not be read"
    if world > 1:
        return "torchrun: every rank would need its own frontier"
    if others:
        return "other modifiers in the recipe calibrate on every layer's real inputs"
    if model_stream:
        return "reconstruction target='model' pushes the dense stream through every layer"
    parents = {name.rsplit(".", 1)[0] for name in names}
    if len(names) < 2 or len(parents) != 1:
        return "the targets do not lie in one list of decoder layers"
    (parent,) = parents
    layers = model.get_submodule(parent) if parent else model
    count = len(layers) if isinstance(layers, nn.ModuleList) else 0
    if [f"{parent}.{i}" if parent else str(i) for i in range(count)] != names:
        return "some decoder layers hold no targets"
    return None


def pipeline_propagates() -> bool | None:
    """Whether the sequential pipeline now calibrating runs each subgraph a second time after
    compressing it (``propagate_error``; the next layer's inputs then come from that pass).

    llm-compressor keeps its dataset arguments to the pipeline's own call, so they are read from
    that call's frame (``SequentialPipeline.__call__``, in ``pipelines/sequential``); ``None``
    when no such frame is found, e.g. under another pipeline (fast-forwarding is then off).
    """
    for frame in pipeline_frames(SEQUENTIAL_PIPELINE):
        arguments = frame.f_locals.get("dataset_args")
        if hasattr(arguments, "propagate_error"):
            return bool(getattr(arguments, "propagate_error"))  # noqa: B009
    return None


def start_fast_forward(
    progress: LayerProgress, modifier: Any, model: nn.Module, targets: list[nn.Linear]
) -> None:
    """Keep a frontier, and skip the loaded layers' passes, where nothing else needs those
    passes (:mod:`.fast_forward`); then read the frontier an earlier run left."""
    others = [m for m in active_session().lifecycle.recipe.modifiers if m is not modifier]
    layer = modifier.reconstruction_settings
    names = progress.layer_names
    propagates = pipeline_propagates()
    fits_to_model = layer.fit_steps > 0 and layer.target == "model"
    why = fast_forward_blocked(model, names, len(others), progress.world, fits_to_model, propagates)
    if why is not None or propagates is None:
        logger.info(f"ARMOR progress: a resumed run forwards through loaded layers ({why})")
        return
    start = time.perf_counter()
    progress.fast_forward = FastForward(progress, model, names, targets,
                                        modifier.register_hook, propagates)  # fmt: skip
    progress.fast_forward.plan()
    progress.seconds += time.perf_counter() - start
