"""ONNX export of armor-ct models and onnxruntime inference (the ``[onnx]`` extra).

- :mod:`.modules` the factored / folded stand-ins for an ARMOR Linear (pure torch)
- :mod:`.export` :func:`export_onnx`: trace, check with onnxruntime, write optimum's layout
- :mod:`.check` read core initializers back from ``model.onnx`` and test their 2:4 pattern
- :mod:`.inference` :class:`OnnxCausalLM`: logits and greedy generation with onnxruntime

Needs ``onnx``, ``onnxruntime`` and ``onnxscript`` (``pip install 'armor-modifier[onnx]'``);
they are imported only when an export or a session runs.
"""

from .check import core_initializers
from .export import EXPORTERS, ONNX_FILE, export_onnx
from .inference import OnnxCausalLM, OnnxLogitsModule

__all__ = [
    "EXPORTERS",
    "ONNX_FILE",
    "OnnxCausalLM",
    "OnnxLogitsModule",
    "core_initializers",
    "export_onnx",
]
