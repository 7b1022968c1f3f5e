"""armor-modifier: ARMOR 2:4 pruning for llm-compressor.

``import armor_modifier`` exposes the solver (:func:`factorize`) and registers the
llm-compressor modifier and the ``armor-ct`` checkpoint loader.
"""

from .core import ARMORFactors, factorize, nowag_p, proxy_loss

__all__ = ["ARMORFactors", "factorize", "nowag_p", "proxy_loss"]
__version__ = "0.1.0"
