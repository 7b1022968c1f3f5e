"""The package's error classes: one base, :class:`ARMORError`, so ``except ARMORError`` catches
everything armor-modifier raises on purpose.

Each also derives from the built-in class that describes it (``ValueError`` for bad input or a
bad file, ``RuntimeError`` for a failed computation), so ``except ValueError`` code still works.
"""

from __future__ import annotations

__all__ = [
    "ARMORCheckpointError",
    "ARMORCompressionError",
    "ARMORError",
    "ARMORMemoryError",
    "ARMORRuntimeError",
    "ARMORTypeError",
    "ARMORValueError",
    "HessianNotPositiveDefinite",
]


class ARMORError(Exception):
    """Base class of every error armor-modifier raises deliberately."""


class ARMORValueError(ARMORError, ValueError):
    """A bad value: a setting, a shape, a target, a calibration set, a text (the message names the
    value and the fix)."""


class ARMORTypeError(ARMORError, TypeError):
    """A value of the wrong type, e.g. a target module that is not an ``nn.Linear``."""


class ARMORMemoryError(ARMORError, MemoryError):
    """The work would not fit in the memory available; raised before it starts (the message says
    how much is needed, for what, and how much is available)."""


class HessianNotPositiveDefinite(ARMORError, ValueError):
    """``H`` stayed non-positive-definite after the bounded damping increases."""


class ARMORCheckpointError(ARMORError, ValueError):
    """An armor-ct checkpoint cannot be written or read; the message names module and tensor."""


class ARMORRuntimeError(ARMORError, RuntimeError):
    """The 2:4 runtime cannot run here (no CUDA, an old GPU, an unsupported dtype or shape)."""


class ARMORCompressionError(ARMORError, RuntimeError):
    """The solver failed on one module; earlier modules are already compressed.

    :ivar module_name: the module that failed
    :ivar compressed: names of the modules already pruned and wrapped, in order
    """

    def __init__(self, module_name: str, compressed: list[str], cause: str):
        self.module_name = module_name
        self.compressed = list(compressed)
        listed = ", ".join(compressed) if compressed else "none"
        super().__init__(
            f"ARMOR failed on module {module_name!r}: {cause}. Modules already compressed "
            f"(2:4 core + wrappers in memory) ({len(compressed)}): {listed}. The other modules "
            f"are unchanged; fix the cause or add {module_name!r} to `ignore` and rerun on the "
            "original model."
        )
