"""The armor-ct checkpoint format: writing, reading (the transformers loader) and dense export.

Imports torch, safetensors, transformers and compressed-tensors only, never llm-compressor, so
loading an armor-ct checkpoint stays light. Modules:

- :mod:`.codec` the 2:4 core codec (kept values + bitmask); :mod:`.packed` bit-packed int cores
- :mod:`.config` the ``quantization_config`` / ``armor`` block; :mod:`.validate` header checks
- :mod:`.safetensors_io` streaming safetensors reads and rewrites
- atomic writes come from :mod:`armor_modifier.staging` (save, export, ONNX, the CLI and the
  harness use it)
- :mod:`.save` armor-ct writing; :mod:`.hooks` the per-model ``save_pretrained`` hook
- :mod:`.loader` the transformers quantizer; :mod:`.export` dense export
"""

from armor_modifier.core.errors import ARMORCheckpointError

from .export import export_dense
from .hooks import install_save_hook, remove_save_hook
from .loader import ARMORCTConfig, ARMORCTHfQuantizer, register
from .save import save_armor_pretrained

__all__ = [
    "ARMORCTConfig",
    "ARMORCTHfQuantizer",
    "ARMORCheckpointError",
    "export_dense",
    "install_save_hook",
    "register",
    "remove_save_hook",
    "save_armor_pretrained",
]
