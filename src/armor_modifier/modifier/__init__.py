"""The llm-compressor adapter: :class:`ARMORModifier`, :class:`ARMORGPTQModifier` and their
engines.

Importing this package imports llm-compressor and registers both modifiers with its
``ModifierFactory`` so YAML recipes can name them. Modules: :mod:`.base` the modifier (fields +
lifecycle), :mod:`.fields` its settings fields derived from the settings objects,
:mod:`.compressor` the per-Linear engine, :mod:`.capture` and :mod:`.reconstruction` the
decoder-layer engine, :mod:`.collectives` torch.distributed, :mod:`.checks` target resolution and
recipe checks, :mod:`.stats` input statistics, :mod:`.report` per-module results, :mod:`.gptq` the
mask-keeping GPTQ modifier.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from armor_modifier.core.errors import ARMORCompressionError

from .base import ARMORModifier
from .gptq import ARMORGPTQModifier
from .report import ARMORModuleResult


def register() -> None:
    """Make ``ARMORModifier`` and ``ARMORGPTQModifier`` available to YAML recipes (idempotent)."""
    for cls in (ARMORModifier, ARMORGPTQModifier):
        if ModifierFactory._registered_registry.get(cls.__name__) is not cls:
            ModifierFactory.register(cls.__name__, cls)


register()

__all__ = [
    "ARMORCompressionError",
    "ARMORGPTQModifier",
    "ARMORModifier",
    "ARMORModuleResult",
    "register",
]
