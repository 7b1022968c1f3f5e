"""armor-modifier: ARMOR 2:4 pruning for llm-compressor.

What a user calls is here: :func:`prune`, :class:`ARMORModifier`, :class:`ARMORGPTQModifier`, the
settings objects, :func:`factorize`, :func:`save_armor_pretrained`, :func:`export_dense`,
:func:`to_semi_structured` and :class:`ARMORError` (every error the package raises on purpose
derives from it; the specific classes are in :mod:`armor_modifier.core.errors`).

``import armor_modifier`` is light: it registers the ``armor-ct`` checkpoint format with
transformers (so ``AutoModelForCausalLM.from_pretrained`` restores the wrappers and the 2:4 cores)
and imports neither llm-compressor nor the CUDA runtime. The names that need them
(``prune``, the modifiers, ``to_semi_structured``) are imported on first access; the modifiers
are then registered with llm-compressor's ``ModifierFactory`` so YAML recipes find them. The same
happens whatever was imported before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core import SolverSettings, factorize
from .core.distill_settings import DistillationSettings
from .core.errors import ARMORError
from .core.reconstruct import ReconstructionSettings
from .format import export_dense, save_armor_pretrained
from .format import register as _register_loader

if TYPE_CHECKING:
    from .cuda import to_semi_structured
    from .modifier import ARMORGPTQModifier, ARMORModifier
    from .pruning import PruneResult, prune

__version__ = "0.1.0"

#: name -> submodule that defines it, imported on first access
_LAZY = {
    "ARMORModifier": "modifier",
    "ARMORGPTQModifier": "modifier",
    "prune": "pruning",
    "PruneResult": "pruning",
    "to_semi_structured": "cuda",
}


def __getattr__(name: str) -> Any:
    """The names of :data:`_LAZY`, imported from their submodule when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_register_loader()

__all__ = [
    "ARMORError",
    "ARMORGPTQModifier",
    "ARMORModifier",
    "PruneResult",
    "DistillationSettings",
    "ReconstructionSettings",
    "SolverSettings",
    "export_dense",
    "factorize",
    "prune",
    "save_armor_pretrained",
    "to_semi_structured",
]
