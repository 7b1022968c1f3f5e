"""The ARMOR math core: pure torch, no framework imports.

Tensors and a frozen :class:`SolverSettings` in, a frozen :class:`ARMORFactors` out. See
``docs/algorithm.md`` for the algorithm. Modules: :mod:`.solver` the block coordinate descent,
:mod:`.proxy` the paper's diagonal proxy (from NoWag-P), :mod:`.output` the output error (from
:mod:`.sparsegpt`), :mod:`.discrete` / :mod:`.sparsity` the 2:4 step and masks, :mod:`.blockdiag`
wrapper products, :mod:`.gptq` mask-keeping GPTQ, :mod:`.wrapper_refit` wrappers refitted to a
quantized core, :mod:`.settings` the knobs, :mod:`.errors` the package's error classes.
"""

from .blockdiag import dense_blockdiag, identity_blocks, left_blockdiag, right_blockdiag
from .errors import (
    ARMORCheckpointError,
    ARMORCompressionError,
    ARMORError,
    ARMORRuntimeError,
    ARMORTypeError,
    ARMORValueError,
    HessianNotPositiveDefinite,
)
from .gptq import GPTQResult, masked_gptq
from .output import OutputObjective
from .problem import check_wrapper_block_size, choose_wrapper_block_size, wrapper_overhead
from .proxy import nowag_p
from .scoring import output_loss, output_ridge, proxy_loss
from .settings import FIELD_HELP, INITS, MODES, OBJECTIVES, SolverSettings
from .solver import ARMORFactors, factorize
from .sparsegpt import SparseGPTResult, sparsegpt_2of4, sparsegpt_prune
from .sparsity import count_broken_groups, is_2_of_4, top2_of_4_mask
from .wrapper_refit import WrapperRefit, refit_wrappers

__all__ = [
    "ARMORCheckpointError",
    "ARMORCompressionError",
    "ARMORError",
    "ARMORFactors",
    "ARMORRuntimeError",
    "ARMORTypeError",
    "ARMORValueError",
    "FIELD_HELP",
    "GPTQResult",
    "HessianNotPositiveDefinite",
    "INITS",
    "MODES",
    "OBJECTIVES",
    "OutputObjective",
    "SolverSettings",
    "SparseGPTResult",
    "WrapperRefit",
    "check_wrapper_block_size",
    "choose_wrapper_block_size",
    "count_broken_groups",
    "dense_blockdiag",
    "factorize",
    "identity_blocks",
    "is_2_of_4",
    "left_blockdiag",
    "masked_gptq",
    "nowag_p",
    "output_loss",
    "output_ridge",
    "proxy_loss",
    "refit_wrappers",
    "right_blockdiag",
    "sparsegpt_2of4",
    "sparsegpt_prune",
    "top2_of_4_mask",
    "wrapper_overhead",
]
