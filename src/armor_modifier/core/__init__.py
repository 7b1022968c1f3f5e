"""The ARMOR math core: pure torch, no framework imports.

Tensors in, a frozen :class:`ARMORFactors` out. See ``ARMOR_SPEC.md`` for the algorithm.
"""

from .blockdiag import dense_blockdiag, identity_blocks, left_blockdiag, right_blockdiag
from .output import OutputObjective, output_loss, output_ridge
from .problem import choose_wrapper_block_size, wrapper_overhead
from .solver import INITS, MODES, OBJECTIVES, ARMORFactors, factorize, nowag_p, proxy_loss
from .sparsegpt import (
    HessianNotPositiveDefinite,
    SparseGPTResult,
    sparsegpt_2of4,
    sparsegpt_prune,
)
from .sparsity import count_broken_groups, is_2_of_4, top2_of_4_mask

__all__ = [
    "ARMORFactors",
    "HessianNotPositiveDefinite",
    "INITS",
    "MODES",
    "OBJECTIVES",
    "OutputObjective",
    "SparseGPTResult",
    "choose_wrapper_block_size",
    "count_broken_groups",
    "dense_blockdiag",
    "factorize",
    "identity_blocks",
    "is_2_of_4",
    "left_blockdiag",
    "nowag_p",
    "output_loss",
    "output_ridge",
    "proxy_loss",
    "right_blockdiag",
    "sparsegpt_2of4",
    "sparsegpt_prune",
    "top2_of_4_mask",
    "wrapper_overhead",
]
