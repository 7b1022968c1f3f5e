"""Shared test settings.

- One intra-op thread: these machines have 2 cores, and multi-threaded BLAS/LAPACK on a busy
  2-core machine was measured 50x slower on the solver's small batched solves (0.64 s vs 0.012 s
  per update of A on a 1536x576 layer).
- ``gpu`` tests skip without a CUDA device of compute capability >= 8.0.
"""

import pytest
import torch

torch.set_num_threads(1)


def _has_sm80_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def pytest_collection_modifyitems(config, items):
    if _has_sm80_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with compute capability >= 8.0")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
