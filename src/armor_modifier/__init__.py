"""armor-modifier: ARMOR 2:4 pruning for llm-compressor.

``import armor_modifier`` exposes the solver (:func:`factorize`), registers
:class:`ARMORModifier` with llm-compressor's ``ModifierFactory`` (so YAML recipes find it) and the
``armor-ct`` checkpoint format with transformers (so ``AutoModelForCausalLM.from_pretrained``
restores the wrappers and the 2:4 cores).
"""

from . import cuda
from . import hf as _hf
from .checkpoint import install_save_hook, save_armor_pretrained
from .checkpoint_format import ArmorCheckpointError
from .core import ARMORFactors, factorize, nowag_p, output_loss, proxy_loss
from .export import export_dense
from .modifier import ARMORCompressionError, ARMORModifier, ARMORModuleResult

_hf.register()

__all__ = [
    "ARMORCompressionError",
    "ARMORFactors",
    "ARMORModifier",
    "ARMORModuleResult",
    "ArmorCheckpointError",
    "cuda",
    "export_dense",
    "factorize",
    "install_save_hook",
    "nowag_p",
    "output_loss",
    "proxy_loss",
    "save_armor_pretrained",
]
__version__ = "0.1.0"
