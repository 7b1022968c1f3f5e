"""Read an exported ``model.onnx`` back: its ARMOR core initializers and their 2:4 pattern."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["core_initializers"]


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
