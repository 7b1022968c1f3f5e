"""armor-modifier: ARMOR 2:4 pruning for llm-compressor.

``import armor_modifier`` exposes the solver (:func:`factorize`, :class:`SolverSettings`) and
registers the ``armor-ct`` checkpoint format with transformers (so
``AutoModelForCausalLM.from_pretrained`` restores the wrappers and the 2:4 cores). It does not
import llm-compressor: :class:`ARMORModifier` is loaded (and registered with llm-compressor's
``ModifierFactory``, so YAML recipes find it) on first access of ``armor_modifier.ARMORModifier``
or on ``import armor_modifier.modifier``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .core import ARMORFactors, SolverSettings, factorize, nowag_p, output_loss, proxy_loss
from .core.errors import (
    ARMORCheckpointError,
    ARMORCompressionError,
    ARMORError,
    ARMORRuntimeError,
    ARMORTypeError,
    ARMORValueError,
    HessianNotPositiveDefinite,
)
from .format import export_dense, install_save_hook, save_armor_pretrained
from .format import register as _register_loader

if TYPE_CHECKING:
    from .modifier import ARMORModifier, ARMORModuleResult

__version__ = "0.1.0"

_LAZY = {"ARMORModifier", "ARMORModuleResult"}


def __getattr__(name: str) -> Any:
    """``ARMORModifier`` / ``ARMORModuleResult`` import llm-compressor only when first asked for."""
    if name in _LAZY:
        from . import modifier

        return getattr(modifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register_loader()
if "llmcompressor" in sys.modules:
    # llm-compressor is already loaded: register ARMORModifier for YAML recipes at no extra cost
    from . import modifier as _modifier  # noqa: F401

__all__ = [
    "ARMORCheckpointError",
    "ARMORCompressionError",
    "ARMORError",
    "ARMORFactors",
    "ARMORModifier",
    "ARMORModuleResult",
    "ARMORRuntimeError",
    "ARMORTypeError",
    "ARMORValueError",
    "HessianNotPositiveDefinite",
    "SolverSettings",
    "export_dense",
    "factorize",
    "install_save_hook",
    "nowag_p",
    "output_loss",
    "proxy_loss",
    "save_armor_pretrained",
]
