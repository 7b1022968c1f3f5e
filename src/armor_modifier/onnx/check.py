"""Read an exported ``model.onnx`` back: its ARMOR core initializers and their 2:4 pattern."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["core_initializers", "is_2of4", "violations_2of4"]


def core_initializers(path: str | os.PathLike, names: list[str]) -> dict[str, np.ndarray]:
    """The initializers of ``model.onnx`` named in ``names``, as arrays (weights read in full).

    :raises KeyError: naming an initializer that the graph does not hold (it was folded away)
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(os.fspath(path)).graph
    found = {init.name: init for init in graph.initializer if init.name in names}
    missing = [name for name in names if name not in found]
    if missing:
        raise KeyError(f"initializers missing from {path}: {missing[:3]} ({len(missing)} in all)")
    return {name: numpy_helper.to_array(found[name]) for name in names}


def violations_2of4(core: np.ndarray) -> int:
    """How many groups of 4 along the last (input) axis of ``core [m, n]`` do not hold exactly
    2 nonzeros (0 for an exact 2:4 core)."""
    groups = core.reshape(core.shape[0], -1, 4)
    return int(((groups != 0).sum(axis=-1) != 2).sum())


def is_2of4(core: np.ndarray) -> bool:
    """Whether ``core [m, n]`` has exactly 2 nonzeros in every group of 4 along its last axis."""
    return core.ndim == 2 and core.shape[1] % 4 == 0 and violations_2of4(core) == 0
