"""The llm-compressor adapter: :class:`ARMORModifier` and its helpers.

Importing this package imports llm-compressor and registers ``ARMORModifier`` with its
``ModifierFactory`` so YAML recipes can name it. Modules: :mod:`.base` the modifier,
:mod:`.checks` target resolution and recipe checks, :mod:`.stats` input statistics,
:mod:`.parallel` the torch.distributed path, :mod:`.report` per-module results and the summary.
"""

from armor_modifier.core.errors import ARMORCompressionError

from .base import ARMORModifier, register
from .gptq import ARMORGPTQModifier
from .report import ARMORModuleResult

register()

__all__ = [
    "ARMORCompressionError",
    "ARMORGPTQModifier",
    "ARMORModifier",
    "ARMORModuleResult",
    "register",
]
